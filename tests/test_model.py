"""latentseek.model: LM-head discovery and the check that logits == lm_head(last hidden state)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Qwen2ForCausalLM,
    Qwen2Model,
)

from latentseek.model import ModelAdapter, cpu_has_bf16_units, default_dtype
from tiny_lm import tiny_model, tiny_tokenizer

V = len(tiny_tokenizer())
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    pad_token_id=0,
)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tie", [False, True])
def test_adapter_finds_the_lm_head_tied_or_untied(arch, tie):
    model = tiny_model(arch, vocab_size=V, tie=tie)
    adapter = ModelAdapter(model)
    assert adapter.tied == tie
    assert adapter.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert (adapter.vocab_size, adapter.hidden_size) == (V, 64)
    ids = torch.tensor([[3, 9, 27, 4]])
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(adapter.hidden(ids)), model(ids).logits, atol=0, rtol=0)


def test_adapter_accepts_a_bfloat16_model():
    model = tiny_model("qwen2", vocab_size=V).to(torch.bfloat16)
    assert ModelAdapter(model).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "model, attribute",
    [
        (lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=30.0)), "softcapping"),
        (lambda: CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.0625)), "logit_scale"),
        (lambda: GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=4.0)), "logits_scaling"),
    ],
)
def test_models_that_transform_their_logits_are_refused(model, attribute):
    with pytest.raises(ValueError, match=attribute):
        ModelAdapter(model())


class _ScaledLogits(Qwen2ForCausalLM):
    """Transforms its logits after the LM head without saying so in its config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out


def test_the_numerical_check_catches_an_undeclared_logit_transform():
    model = _ScaledLogits(tiny_model("qwen2", vocab_size=V).config).eval()
    with pytest.raises(ValueError, match="differ from lm_head"):
        ModelAdapter(model)
    ModelAdapter(model, check=False)  # the config alone cannot tell


def test_a_model_without_lm_head_is_refused():
    base = tiny_model("qwen2", vocab_size=V).model
    assert isinstance(base, Qwen2Model)
    with pytest.raises(ValueError, match="no LM head"):
        ModelAdapter(base)


def test_softcapping_set_to_none_is_fine():
    model = Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=None)).eval()
    ModelAdapter(model)


def test_default_dtype_is_bfloat16_on_cuda_and_on_cpus_with_bf16_units(monkeypatch):
    assert default_dtype("cuda") is torch.bfloat16 and default_dtype(torch.device("cuda", 1)) is torch.bfloat16
    for amx, avx512_bf16, want in [
        (False, False, torch.float32),
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
        (True, True, torch.bfloat16),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=avx512_bf16: b)
        assert cpu_has_bf16_units() is (amx or avx512_bf16)
        assert default_dtype("cpu") is want and default_dtype(torch.device("cpu")) is want
