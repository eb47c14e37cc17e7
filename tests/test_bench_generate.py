"""benchmarks/bench_generate.py without the GGUF: the tokens/s arithmetic and the torch route's decode clock."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_generate  # noqa: E402


def test_tokens_per_s_counts_every_row_and_excludes_the_first_pick():
    row = bench_generate.Row(bench_generate.Route("torch", "fp32", 2), batch=8, new_tokens=5, decode_s=(2.0, 4.0, 1.0))
    band = row.tokens_per_s
    assert (band.median, band.runs) == (16.0, 3)  # 8 rows * 4 decode steps / 2 s
    assert row.route.name == "torch fp32, 2 threads"


def test_torch_decoder_runs_every_row_to_the_cap_on_its_threads():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from latentseek import ModelAdapter

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    threads = torch.get_num_threads()
    try:
        decode = bench_generate.torch_decoder(ModelAdapter(model), 1)
        seconds = decode([[1, 2, 3], [4, 5]], 6)
        assert torch.get_num_threads() == 1
        assert seconds > 0
    finally:
        torch.set_num_threads(threads)


def test_the_fused_sampling_route_counts_the_rows_that_took_logits():
    from latentseek import ModelAdapter
    from tiny_lm import tiny_model

    def counted(adapter: ModelAdapter) -> bench_generate.LogitRows:
        counts = bench_generate.LogitRows()
        bench_generate.torch_decoder(adapter, torch.get_num_threads(), "sample-fused", counts)([[1, 2, 3], [4, 5]], 6)
        assert "logits" not in vars(adapter)  # the counting wrapper is gone
        return counts

    peaked = ModelAdapter(tiny_model("qwen2", vocab_size=64))  # the nucleus closes within the top 32 tokens
    assert counted(peaked) == bench_generate.LogitRows(picked=12, with_logits=0)
    flat = ModelAdapter(tiny_model("qwen2", vocab_size=64))
    with torch.no_grad():
        flat.weight.mul_(1e-4)  # near-uniform over 64 tokens: the top 32 hold about half of the mass
    assert counted(flat) == bench_generate.LogitRows(picked=12, with_logits=12)
    bench_generate.torch_decoder(peaked, torch.get_num_threads(), "sample-logits")([[1, 2, 3]], 4)
    route = bench_generate.Route("torch", "bf16", 1, "sample-fused")
    assert route.name == "torch bf16, 1 thread, sample-fused"


def test_accuracy_scores_a_route_against_the_reference_by_teacher_forcing():
    from latentseek import ModelAdapter
    from tiny_lm import tiny_model

    dense = tiny_model("qwen2", vocab_size=64)
    other = tiny_model("qwen2", vocab_size=64, seed=1)
    int8 = bench_generate.quantized(dense, "int8")
    assert int8.dtype == torch.bfloat16 and dense.dtype == torch.float32  # quantised from a copy of fp32
    prompts = [[1, 2, 3, 4], [5, 6]]
    got = bench_generate.accuracy(
        ModelAdapter(dense),
        {"itself": ModelAdapter(dense), "int8": ModelAdapter(int8), "another model": ModelAdapter(other)},
        prompts,
        10,
    )
    assert got["itself"]["agreement"] == 1.0 and got["itself"]["first_disagreement"] == [10, 10]
    assert got["itself"]["cosine_min"] > 0.9999
    assert 0.99 < got["int8"]["cosine_mean"] <= 1.0 + 1e-6
    assert got["another model"]["agreement"] < 0.5 and got["another model"]["cosine_mean"] < 0.9
    assert all(0 <= i <= 10 for a in got.values() for i in a["first_disagreement"])


def test_a_decode_path_route_is_named_and_scored_against_the_eager_route():
    from latentseek import ModelAdapter
    from tiny_lm import tiny_model

    adapter = ModelAdapter(tiny_model("qwen2", vocab_size=64))
    eager, graph = bench_generate.Route("torch", "fp32", 1), bench_generate.Route("torch", "fp32", 1, decode="graph")
    assert graph.name == "torch fp32, 1 thread, graph"
    prompts = [[1, 2, 3], [4, 5]]
    last: dict = {(eager, 2): [], (graph, 2): []}
    threads = torch.get_num_threads()
    try:
        for route in (eager, graph):
            bench_generate.torch_decoder(adapter, 1, decode_path=route.decode, tokens_out=last[(route, 2)])(prompts, 6)
    finally:
        torch.set_num_threads(threads)
    assert [len(t) for t in last[(graph, 2)]] == [6, 6]
    assert bench_generate.decode_agreement(last) == [
        {"route_name": "torch fp32, 1 thread, graph", "batch": 2, "same": 12, "tokens": 12}
    ]
    last[(graph, 2)] = [[t + 1 for t in last[(graph, 2)][0]], last[(graph, 2)][1]]  # one row's tokens all differ
    assert bench_generate.decode_agreement(last)[0]["same"] == 6
