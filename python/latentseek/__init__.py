"""LatentSeek: test-time policy gradient on an LLM's last-layer hidden states."""
