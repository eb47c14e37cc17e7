"""latentseek: LatentSeek (arXiv 2505.13308), test-time policy gradient on an LLM's last-layer hidden states.

    model, tokenizer = latentseek.load_model("qwen2.5-0.5b-instruct-q4.gguf")
    seek = latentseek.LatentSeek(model, tokenizer, latentseek.rewards.SelfReward(model, tokenizer))
    result = seek.solve("A pen costs 3 dollars. How much do 4 pens cost?")

:mod:`latentseek.loop` is the algorithm, :mod:`latentseek.generation` the KV-cached batched generation it runs on,
:mod:`latentseek.model` the model adapter, :mod:`latentseek.rewards` the rewards.
"""

from . import rewards
from .chat import build_prompt_ids, stop_token_ids
from .config import MAX_UPDATE_LENGTH, LatentSeekConfig
from .generation import Generation, generate
from .loop import LatentSeek, Result
from .model import ModelAdapter, load_model

__all__ = [
    "MAX_UPDATE_LENGTH",
    "Generation",
    "LatentSeek",
    "LatentSeekConfig",
    "ModelAdapter",
    "Result",
    "build_prompt_ids",
    "generate",
    "load_model",
    "rewards",
    "stop_token_ids",
]
