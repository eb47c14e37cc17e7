"""The model adapter: what LatentSeek needs from a transformers causal LM, found once and checked.

LatentSeek optimises the vectors z that the LM head reads, so it must be true that ``logits = W z + b`` with z the
base model's ``last_hidden_state`` (the output of the final norm). :class:`ModelAdapter` finds the base model and
the LM head (tied or untied), refuses models whose logits are transformed after the LM head (Gemma-2 style
final-logit softcapping, Cohere's logit scale, Granite's logit scaling, ...), and checks the identity numerically
on a short input when it is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

# Config attributes of transformers models that change the logits after the LM head, with their neutral values.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None, 0, 0.0),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "lm_head_multiplier": (None, 1, 1.0),
}

# The identity check's tolerance relative to the largest logit: both sides run the same matmul, so fp32 agrees to
# rounding; 16-bit dtypes get their own precision.
_CHECK_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}
_CHECK_TOKENS = 8


class ModelAdapter:
    """A causal LM seen as ``base`` (tokens -> post-norm hidden states) and an LM head ``logits = W h + b``.

    Args:
        model: a transformers causal LM (``*ForCausalLM``) with an ``lm_head``-style output embedding.
        check: run the numerical check that the model's logits equal ``W h + b`` (recommended; a few ms).

    Raises:
        ValueError: the model has no LM head, is an encoder-decoder, or changes its logits after the LM head.
    """

    def __init__(self, model: torch.nn.Module, *, check: bool = True) -> None:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"LatentSeek needs a transformers model with a config, got {type(model).__name__}")
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"LatentSeek needs a decoder-only causal LM, got encoder-decoder {type(model).__name__}")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if head is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"{type(model).__name__} has no LM head (get_output_embeddings() returned {type(head).__name__}): "
                "LatentSeek optimises the hidden states an LM head reads, so load the model with "
                "AutoModelForCausalLM, not AutoModel"
            )
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        for name, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(text_config, name, None)
            if value not in neutral:
                raise ValueError(
                    f"{type(model).__name__} sets {name}={value}: its logits are not lm_head(h), so the LatentSeek "
                    "gradient (which differentiates W h + b) would be wrong for it; this model is not supported"
                )
        self.model = model
        self.base = model.get_decoder()
        self.weight = weight.detach()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach()
        embeddings = model.get_input_embeddings()
        self.tied = embeddings is not None and embeddings.weight.data_ptr() == weight.data_ptr()
        if check:
            self.check_logits()

    @classmethod
    def of(cls, model: torch.nn.Module | ModelAdapter) -> ModelAdapter:
        """The adapter of ``model``: ``model`` itself when it is one already, else a new (checked) adapter.

        Functions that take "a model or its adapter" call this once; passing the adapter avoids rebuilding it (the
        build runs the logits check, a short forward).
        """
        return model if isinstance(model, ModelAdapter) else cls(model)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def num_layers(self) -> int:
        config = self.model.config
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        return text_config.num_hidden_layers

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``W h + b`` for hidden states ``[*, H]`` in the model's dtype."""
        return F.linear(hidden, self.weight, self.bias)

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """The base model's ``last_hidden_state`` ``[B, T, H]`` (post final norm), extending ``cache`` if given."""
        out = self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    @torch.no_grad()
    def check_logits(self) -> None:
        """Raise ValueError unless ``model(ids).logits == W h + b`` with h the base model's last hidden state."""
        ids = torch.arange(1, _CHECK_TOKENS + 1, device=self.device)[None] % self.vocab_size
        expected = self.model(input_ids=ids).logits.float()
        got = self.logits(self.hidden(ids)).float()
        if expected.shape != got.shape:
            raise ValueError(
                f"{type(self.model).__name__}'s logits have shape {list(expected.shape)} but its LM head gives "
                f"{list(got.shape)}: LatentSeek needs logits = lm_head(last hidden state)"
            )
        err = (expected - got).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        tol = _CHECK_RTOL.get(self.dtype, 1e-2) * scale
        if not err <= tol:
            raise ValueError(
                f"{type(self.model).__name__}'s logits differ from lm_head(last hidden state) by up to {err:.3g} "
                f"(tolerance {tol:.3g}): the model transforms its logits after the LM head (softcapping, scaling, "
                "...), which LatentSeek cannot differentiate; this model is not supported"
            )


def load_model(
    path: str,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)`` from a local transformers directory or a GGUF file, ready for LatentSeek.

    Args:
        path: a model directory, or a ``.gguf`` file (then ``gguf_file`` is taken from it).
        gguf_file: the GGUF file name inside the directory ``path`` (transformers dequantises it on load).
        dtype: the weights' dtype; None picks float32 on CPU (bfloat16 matmuls are slow on CPUs without AMX) and
            bfloat16 on CUDA.
        device: where the model goes.

    Returns:
        the causal LM in eval mode without parameter gradients, and its tokenizer.
    """
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_file is None and path.endswith(".gguf"):
        path, gguf_file = os.path.split(os.path.abspath(path))
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return model, tokenizer
