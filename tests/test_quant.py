"""latentseek.quant: weight-only int8 / int4 linears on torch's CPU kernels, and a quantised tiny model end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from latentseek import LatentSeek, LatentSeekConfig, load_model
from latentseek.chat import build_prompt_ids
from latentseek.errors import ModelLoadError
from latentseek.generation import generate
from latentseek.model import ModelAdapter
from latentseek.quant import (
    DECODE_HEAD,
    INT4_GROUP_SIZES,
    Int4Linear,
    Int8Linear,
    int4_quantize,
    quantize_weights,
)
from naive_loop import Scripted
from tiny_lm import QUESTIONS, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def vocab(tok) -> int:
    """The tokenizer's size rounded up to the int4 kernel's multiple of 16 output channels, so the head packs."""
    return -(-len(tok) // 16) * 16


def linear(n: int = 48, k: int = 128, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(1)
    layer = torch.nn.Linear(k, n, bias=bias)
    layer.weight.data = torch.randn(n, k) * torch.linspace(0.01, 3.0, k)  # groups with very different ranges
    return layer


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES[:3])
def test_int4_weights_are_the_nearest_point_of_their_group_grid(group_size):
    w = linear().weight
    q, sz = int4_quantize(w, group_size)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    scale = sz[..., 0].float().T.repeat_interleave(group_size, dim=1)  # [N, K]
    zero = sz[..., 1].float().T.repeat_interleave(group_size, dim=1)
    deq = (q.float() - 8) * scale + zero
    assert ((w - deq).abs() <= scale / 2 * (1 + 1e-3) + 1e-6).all()
    # the kernel multiplies by exactly that grid
    layer = Int4Linear(linear(), group_size)
    torch.testing.assert_close(layer.dequantized(), deq.bfloat16().float())


def test_int8_weights_are_the_nearest_point_of_their_channel_grid():
    dense = linear()
    layer = Int8Linear(dense)
    scale = layer.scale.float()[:, None]
    assert ((dense.weight - layer.dequantized()).abs() <= scale / 2 * (1 + 1e-3)).all()


@pytest.mark.parametrize("make", [Int8Linear, lambda layer: Int4Linear(layer, 32)], ids=["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantised_linear_computes_x_times_its_weight_in_the_input_dtype(make, dtype):
    dense = linear()
    layer = make(dense)
    x = torch.randn(2, 3, 128).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    want = x.bfloat16().float() @ layer.dequantized().T + dense.bias
    torch.testing.assert_close(y.float(), want, atol=0.05 * want.abs().max().item(), rtol=0)
    # a strided input (the last position of a sequence, as generation passes it)
    torch.testing.assert_close(layer(x[:, -1]).float(), y[:, -1].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_quantised_model_decodes_close_to_the_dense_one_and_keeps_its_dense_head(tok, weights, tie):
    dense = tiny_model("qwen2", vocab_size=vocab(tok), tie=tie)
    model = copy.deepcopy(dense)
    head = model.get_output_embeddings().weight.clone()
    assert quantize_weights(model, weights) == []
    decoder = model.get_decoder()
    assert not any(isinstance(m, torch.nn.Linear) for m in decoder.modules())
    assert isinstance(getattr(model, DECODE_HEAD), Int8Linear if weights == "int8" else Int4Linear)
    adapter = ModelAdapter(model)  # its logits check passes: model(...).logits reads the dense head
    torch.testing.assert_close(adapter.weight, head, atol=0, rtol=0)  # the op's W stays dense
    assert adapter.decode_head is getattr(model, DECODE_HEAD)

    # the quantised model is the model with the grid weights (up to its bf16 activations) ...
    grid = copy.deepcopy(dense)
    for name, module in decoder.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            grid.get_decoder().get_submodule(name).weight.data = module.dequantized()
    ids = torch.tensor([build_prompt_ids(tok, QUESTIONS[1])])
    h_quant = adapter.hidden(ids)[0].float()
    cosine = torch.nn.functional.cosine_similarity(ModelAdapter(grid).hidden(ids)[0], h_quant, dim=-1)
    assert cosine.min() > 0.99
    # ... and close to the dense model: int4 less so on this random model (std-0.2 weights, no outliers to spare)
    cosine = torch.nn.functional.cosine_similarity(ModelAdapter(dense).hidden(ids)[0], h_quant, dim=-1)
    assert (cosine.min() if weights == "int8" else cosine.mean()) > (0.99 if weights == "int8" else 0.9)
    head_logits = getattr(model, DECODE_HEAD)(h_quant)
    torch.testing.assert_close(adapter.logits(h_quant), head_logits, atol=0, rtol=0)

    prompts = [build_prompt_ids(tok, q) for q in QUESTIONS]
    out = generate(adapter, tok, prompts, 12, return_hidden=True)
    assert [len(t) for t in out.tokens] == [len(h) for h in out.hidden] and all(out.tokens)


def test_latentseek_runs_on_a_quantised_model(tok):
    model = tiny_model("qwen2", vocab_size=vocab(tok))
    quantize_weights(model, "int4")
    config = LatentSeekConfig(max_new_tokens=20, max_steps=4, rho=0.5, lr=0.3)
    result = LatentSeek(model, tok, Scripted([-1.0, -1.0, 0.0]), config).solve(QUESTIONS[1])
    assert result.steps == 2 and result.solved


def test_linears_the_int4_groups_do_not_divide_stay_dense(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))  # hidden 64, intermediate 128
    dense = quantize_weights(model, "int4", group_size=128)
    decoder = model.get_decoder()
    assert "lm_head" in dense
    assert all(isinstance(decoder.get_submodule(name), torch.nn.Linear) for name in dense if name != "lm_head")
    assert all(decoder.get_submodule(name).in_features == 64 for name in dense if name != "lm_head")
    assert isinstance(decoder.get_submodule("layers.0.mlp.down_proj"), Int4Linear)  # 128 inputs
    assert getattr(model, DECODE_HEAD) is None and ModelAdapter(model).decode_head is None


def test_bad_quantisation_requests_say_what_was_expected(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    with pytest.raises(ValueError, match=r"weights must be one of .*'int3'"):
        quantize_weights(model, "int3")
    with pytest.raises(ValueError, match="group_size must be one of .*48"):
        quantize_weights(model, "int4", group_size=48)
    with pytest.raises(ValueError, match="group_size must be one of .* divide the weight's 128 inputs, got 256"):
        int4_quantize(torch.randn(4, 128), 256)
    assert quantize_weights(model, "dense") == [] and not hasattr(model, DECODE_HEAD)
    quantize_weights(model, "int8")
    with pytest.raises(ValueError, match="quantised already"):
        quantize_weights(model, "int4")


def test_load_model_quantises_on_request(tok, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("qwen2", vocab_size=vocab(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    model, _ = load_model(folder, dtype=torch.bfloat16, weights="int4")
    assert isinstance(model.get_decoder().layers[0].mlp.up_proj, Int4Linear)
    assert isinstance(getattr(model, DECODE_HEAD), Int4Linear)
    with pytest.raises(ModelLoadError, match=r"weights must be one of .*'int2'"):
        load_model(folder, weights="int2")


def test_weights_of_names_what_a_run_config_records():
    from latentseek.quant import weights_of

    assert weights_of(torch.nn.Sequential(torch.nn.Linear(64, 32))) == "dense"
    assert weights_of(torch.nn.Sequential(Int4Linear(torch.nn.Linear(64, 32), 32))) == "int4-g32"
    assert weights_of(torch.nn.Sequential(Int8Linear(torch.nn.Linear(64, 32)))) == "int8"
