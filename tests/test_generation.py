"""latentseek.generation: KV-cached batched generation against full forwards without cache; the static-shape decode
step (decode="graph", and compiled on the CPU) against the eager one; on every device of conftest.DEVICES."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import latentseek.static_decode as static_decode
from conftest import DEVICES
from latentseek.chat import build_prompt_ids, stop_token_ids
from latentseek.generation import DecodeStep, extend, generate, sampling_picker
from latentseek.kv_cache import PrefixCache
from latentseek.model import ModelAdapter
from latentseek.static_decode import bucket, default_decode
from tiny_lm import QUESTIONS, tiny_model, tiny_tokenizer

MAX_NEW = 24


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def adapter(request, tok, device):
    return ModelAdapter(tiny_model(request.param, vocab_size=len(tok), device=device))


@pytest.fixture(scope="module")
def prompts(tok):
    return [build_prompt_ids(tok, q) for q in QUESTIONS]


def full_forward_hidden(adapter: ModelAdapter, ids: list[int]) -> torch.Tensor:
    """The last position's post-norm hidden state from a forward over the whole sequence, no cache."""
    with torch.no_grad():
        return adapter.hidden(torch.tensor([ids], device=adapter.device))[0, -1]


def test_hidden_states_equal_model_forward(adapter, tok, prompts):
    out = generate(adapter, tok, prompts, MAX_NEW, return_hidden=True)
    for prompt, tokens, hidden in zip(prompts, out.tokens, out.hidden, strict=True):
        assert hidden.shape == (len(tokens), adapter.hidden_size)
        for t, token in enumerate(tokens):
            expected = full_forward_hidden(adapter, prompt + tokens[:t])
            torch.testing.assert_close(hidden[t], expected, atol=2e-5, rtol=1e-5)
            assert int(adapter.logits(hidden[t]).argmax()) == token


def test_batched_equals_one_by_one(adapter, tok, prompts):
    batch = generate(adapter, tok, prompts, MAX_NEW, return_hidden=True)
    assert len({len(p) for p in prompts}) > 1, "the prompts must need padding"
    for i, prompt in enumerate(prompts):
        alone = generate(adapter, tok, [prompt], MAX_NEW, return_hidden=True)
        assert alone.tokens[0] == batch.tokens[i]
        assert alone.stopped[0] == batch.stopped[i]
        torch.testing.assert_close(alone.hidden[0], batch.hidden[i], atol=2e-5, rtol=1e-5)


def test_rows_stop_at_their_own_stop_token_or_the_cap(adapter, tok, prompts):
    free = generate(adapter, tok, prompts, MAX_NEW, stop_ids=[])
    assert all(len(t) == MAX_NEW for t in free.tokens) and not any(free.stopped)
    # a stop token that row 0 produces and some other row never does
    stop = next(t for t in free.tokens[0] if any(t not in row for row in free.tokens))
    out = generate(adapter, tok, prompts, MAX_NEW, stop_ids=[stop])
    for row, tokens in zip(free.tokens, out.tokens, strict=True):
        if stop in row:
            assert tokens == row[: row.index(stop) + 1]
        else:
            assert tokens == row
    assert out.stopped == [stop in row for row in free.tokens]


def test_extend_after_prefix_caches_equals_generation_from_scratch(adapter, tok, prompts):
    """Rows with caches of different lengths and new tokens of different lengths (padding in the middle)."""
    extra = [[5, 6, 7], [], [8], [9, 10, 11, 12, 13]]
    new = [[14], [15, 16, 17, 18], [19, 20], [21]]
    seqs = [p + e for p, e in zip(prompts, extra, strict=True)]
    first = extend(adapter, [(None, s) for s in seqs], 1, [], keep_prefix=[len(s) for s in seqs])
    caches = first.prefixes
    assert [c.length for c in caches] == [len(s) for s in seqs]
    assert first.prefill_tokens == sum(len(s) for s in seqs)
    got = extend(
        adapter, list(zip(caches, new, strict=True)), MAX_NEW, stop_token_ids(tok, adapter), return_hidden=True
    )
    for i in range(len(seqs)):
        want = generate(adapter, tok, [seqs[i] + new[i]], MAX_NEW, return_hidden=True)
        assert got.tokens[i] == want.tokens[0]
        torch.testing.assert_close(got.hidden[i], want.hidden[0], atol=2e-5, rtol=1e-5)


def test_kept_prefix_holds_the_keys_and_values_of_a_fresh_forward(adapter, tok, prompts):
    keep = [len(p) + 2 for p in prompts]
    out = extend(adapter, [(None, p) for p in prompts], 5, [], keep_prefix=keep)
    for prompt, tokens, prefix in zip(prompts, out.tokens, out.prefixes, strict=True):
        ids = prompt + tokens[:2]
        fresh = PrefixCache(*_fresh_cache(adapter, ids))
        assert prefix.length == fresh.length == len(ids)
        for (k, v), (k0, v0) in zip(prefix.layers, fresh.layers, strict=True):
            torch.testing.assert_close(k, k0, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(v, v0, atol=2e-5, rtol=1e-5)


def _fresh_cache(adapter, ids):
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        adapter.hidden(torch.tensor([ids], device=adapter.device), cache=cache)
    return [(layer.keys, layer.values) for layer in cache.layers], len(ids)


def test_empty_inputs_are_rejected(adapter, tok, prompts):
    with pytest.raises(ValueError, match="no prompts"):
        generate(adapter, tok, [], 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(adapter, tok, [prompts[0], []], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(adapter, tok, prompts, 0)


# --- sampling ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_p", [0.9, 1.0])
@pytest.mark.parametrize("sampler", ["logits", "fused"])
def test_sampling_is_reproducible_and_independent_of_the_batch(adapter, tok, prompts, sampler, top_p):
    kw = dict(do_sample=True, temperature=1.5, top_p=top_p, sampler=sampler)
    a = generate(adapter, tok, prompts, MAX_NEW, seed=3, **kw)
    b = generate(adapter, tok, prompts, MAX_NEW, seed=3, **kw)
    c = generate(adapter, tok, prompts, MAX_NEW, seed=4, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    # row 0 keeps its draws whatever the other rows are
    d = generate(adapter, tok, [prompts[0], prompts[2]], MAX_NEW, seed=3, **kw)
    assert d.tokens[0] == a.tokens[0]
    greedy = generate(adapter, tok, prompts, MAX_NEW)
    assert a.tokens != greedy.tokens


@pytest.mark.parametrize("sampler", ["logits", "fused"])
def test_tiny_top_p_is_greedy(adapter, tok, prompts, sampler):
    sampled = generate(adapter, tok, prompts, MAX_NEW, do_sample=True, top_p=1e-9, seed=0, sampler=sampler)
    assert sampled.tokens == generate(adapter, tok, prompts, MAX_NEW).tokens


def test_sampling_follows_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(4000, 1)
    temperature, top_p = 0.8, 0.8
    pick = sampling_picker(temperature, top_p, seed=0, num_rows=4000)
    tokens = pick(DecodeStep(None, logits[:, :0], logits), list(range(4000)))
    probs = torch.softmax(logits[0] / temperature, -1)
    nucleus = int((probs.cumsum(0) - probs < top_p).sum())  # the smallest prefix reaching top_p
    counts = torch.bincount(tokens, minlength=6).float()
    assert counts[nucleus:].sum() == 0
    want = probs[:nucleus] / probs[:nucleus].sum()
    # 4000 draws: a frequency's standard deviation is below 0.008, so 0.03 is a wide margin
    torch.testing.assert_close(counts[:nucleus] / 4000, want, atol=0.03, rtol=0)


def test_sampling_arguments_are_checked(tok):
    with pytest.raises(ValueError, match="temperature"):
        sampling_picker(0.0, 1.0, 0, 1)
    with pytest.raises(ValueError, match="top_p"):
        sampling_picker(1.0, 0.0, 0, 1)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sampling_picker(1.0, 1.0, 0, 1, sampler="gumbel")
    with pytest.raises(ValueError, match="sampler must be one of"):
        generate(tiny_model("qwen2", vocab_size=len(tok)), tok, [[1, 2]], 2, sampler="nucleus")


def test_fused_nucleus_draws_the_logits_samplers_tokens(adapter, tok, prompts):
    """top_p < 1: the fused sampler reads the nucleus from the op's top-32 log-probs with the logits sampler's own
    uniform numbers, so in fp32 both draw the same tokens (the tiny model's 82-token vocabulary is diffuse enough
    that some rows' nucleus is not closed within 32 tokens: those take the logits path)."""
    if adapter.dtype != torch.float32:
        pytest.skip("the probabilities agree to rounding only in fp32")
    kw = dict(do_sample=True, temperature=1.2, top_p=0.9, seed=5)
    fused = generate(adapter, tok, prompts, MAX_NEW, sampler="fused", **kw)
    assert fused.tokens == generate(adapter, tok, prompts, MAX_NEW, sampler="logits", **kw).tokens


class CountingHead:
    """The adapter attributes the pickers read (weight, bias, vocab_size, logits), counting the rows whose logits
    were asked for."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.bias, self.vocab_size = weight, None, weight.shape[0]
        self.logit_rows: list[int] = []

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        self.logit_rows.append(h.shape[0])
        return h @ self.weight.T


def test_fused_nucleus_takes_logits_only_for_rows_whose_nucleus_is_not_closed():
    torch.manual_seed(0)
    V, H = 200, 16
    head = CountingHead(torch.randn(V, H))
    peaked = 3.0 * head.weight[:6] / head.weight[:6].norm(dim=-1, keepdim=True) ** 2 * 4  # one token dominates
    diffuse = 1e-3 * torch.randn(4, H)  # near uniform over 200 tokens: 32 of them hold about 0.16 of the mass
    h = torch.cat([peaked[:3], diffuse[:2], peaked[3:], diffuse[2:]])
    probs = torch.softmax(h @ head.weight.T, -1)
    top32 = probs.topk(32, dim=-1).values.sum(-1)
    open_rows = (top32 < 0.9).nonzero()[:, 0].tolist()
    assert open_rows == [3, 4, 8, 9], top32  # the case the test is about
    seeds = [11 * r + 1 for r in range(len(h))]
    rows = list(range(len(h)))
    for _ in range(3):  # three draws, so the rows' generators move on together
        fused = sampling_picker(1.0, 0.9, 0, len(h), row_seeds=seeds, sampler="fused")
        logits = sampling_picker(1.0, 0.9, 0, len(h), row_seeds=seeds)
        head.logit_rows.clear()
        got = fused(DecodeStep(head, h), rows)
        assert head.logit_rows == [len(open_rows)]
        assert got.tolist() == logits(DecodeStep(head, h), rows).tolist()
        seeds = [s + 1 for s in seeds]
    head.logit_rows.clear()
    closed = torch.cat([peaked[:3], peaked[3:]])
    sampling_picker(1.0, 0.9, 0, len(closed), sampler="fused")(DecodeStep(head, closed), list(range(len(closed))))
    assert head.logit_rows == []


def test_fused_top_p_one_is_the_ops_gumbel_sampler():
    """top_p = 1: the op's Gumbel-max draws with per-row counters: softmax(l / T) frequencies, a row's draws
    independent of the other rows, a new draw at each step, and no logits."""
    values = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    head = CountingHead(torch.eye(6))
    n, temperature = 4000, 0.8
    h = values.repeat(n, 1)
    seeds = [1_000_003 * r + 7 for r in range(n)]
    pick = sampling_picker(temperature, 1.0, 9, n, row_seeds=seeds, sampler="fused")
    first = pick(DecodeStep(head, h), list(range(n)))
    second = pick(DecodeStep(head, h), list(range(n)))
    assert head.logit_rows == []
    want = torch.softmax(values / temperature, -1)
    for draws in (first, second):
        # 4000 draws: a frequency's standard deviation is below 0.008, so 0.03 is a wide margin; T = 1 would be
        # 0.09 off on the first token
        torch.testing.assert_close(torch.bincount(draws, minlength=6).float() / n, want, atol=0.03, rtol=0)
    assert (first != second).float().mean() > 0.3  # a second draw is a new draw
    some = [5, 17, 3000]
    alone = sampling_picker(temperature, 1.0, 9, 3, row_seeds=[seeds[r] for r in some], sampler="fused")
    assert alone(DecodeStep(head, h[some]), [0, 1, 2]).tolist() == first[some].tolist()


# --- prompts and stop tokens ---------------------------------------------------------------------------------------


def test_build_prompt_ids_uses_the_chat_template(tok):
    ids = build_prompt_ids(tok, "what is 2 + 3 ?", system="check it")
    want = tok.apply_chat_template(
        [{"role": "system", "content": "check it"}, {"role": "user", "content": "what is 2 + 3 ?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert ids == list(want)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    messages = [{"role": "user", "content": "what is 2 + 3 ?"}]
    assert build_prompt_ids(tok, messages) == build_prompt_ids(tok, "what is 2 + 3 ?")


@pytest.mark.parametrize("bad", ["", "  \n", [], [{"role": "user", "content": " "}], [{"content": "x"}]])
def test_build_prompt_ids_rejects_empty_or_malformed_questions(tok, bad):
    with pytest.raises(ValueError):
        build_prompt_ids(tok, bad)


def test_build_prompt_ids_needs_a_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        build_prompt_ids(tok, "what is 2 + 3 ?")


def test_stop_tokens_include_eos_and_the_end_of_turn_token():
    tok = tiny_tokenizer(eos_token="<|endoftext|>")
    model = tiny_model("qwen2", vocab_size=len(tok), eos_token_id=[0, 7])
    ids = stop_token_ids(tok, model)
    assert ids[0] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert 7 in ids
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids  # found from the template, not from eos


# --- the static-shape decode step (decode="graph") -----------------------------------------------------------------


def assert_same_generation(got, want) -> None:
    """Same tokens and stops; hidden states and kept prefixes equal to float32 rounding."""
    assert got.tokens == want.tokens
    assert got.stopped == want.stopped
    if want.hidden is not None:
        for g, w in zip(got.hidden, want.hidden, strict=True):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
    for g, w in zip(got.prefixes, want.prefixes, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.length == w.length
            for (k, v), (k0, v0) in zip(g.layers, w.layers, strict=True):
                torch.testing.assert_close(k, k0, atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(v, v0, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 4, 6], ids=["1-row", "4-rows", "6-rows-bucket-8"])
def test_graph_decode_equals_eager(adapter, tok, prompts, n):
    """Prompts of different lengths, rows stopping at different steps, padding rows (6 rows run in bucket 8), rows
    moving to smaller buckets, kept prefixes: the same tokens, hidden states and caches as the eager steps."""
    batch = (prompts * 2)[:n]
    keep = [len(p) + 3 for p in batch]
    stop = stop_token_ids(tok, adapter)
    kw = dict(return_hidden=True, keep_prefix=keep)
    want = extend(adapter, [(None, p) for p in batch], MAX_NEW, stop, decode="eager", **kw)
    got = extend(adapter, [(None, p) for p in batch], MAX_NEW, stop, decode="graph", **kw)
    assert_same_generation(got, want)
    if n > 1:
        assert len({len(t) for t in want.tokens}) > 1, "the rows must stop at different steps"


def test_graph_decode_after_prefix_caches_equals_eager(adapter, tok, prompts):
    """Rows with caches of different lengths and new tokens of different lengths (padding in the middle)."""
    extra = [[5, 6, 7], [], [8], [9, 10, 11, 12, 13]]
    new = [[14], [15, 16, 17, 18], [19, 20], [21]]
    seqs = [p + e for p, e in zip(prompts, extra, strict=True)]
    first = extend(adapter, [(None, s) for s in seqs], 1, [], keep_prefix=[len(s) for s in seqs])
    rows = list(zip(first.prefixes, new, strict=True))
    stop = stop_token_ids(tok, adapter)
    keep = [len(s) + len(t) + 2 for s, t in zip(seqs, new, strict=True)]
    kw = dict(return_hidden=True, keep_prefix=keep)
    want = extend(adapter, rows, MAX_NEW, stop, decode="eager", **kw)
    assert_same_generation(extend(adapter, rows, MAX_NEW, stop, decode="graph", **kw), want)


def test_graph_decode_samples_like_eager(adapter, tok, prompts):
    kw = dict(do_sample=True, temperature=1.5, top_p=0.9, seed=5)
    want = generate(adapter, tok, prompts, MAX_NEW, decode="eager", **kw)
    assert generate(adapter, tok, prompts, MAX_NEW, decode="graph", **kw).tokens == want.tokens


def test_graph_decode_runs_the_bucket_of_the_running_rows(adapter, tok, prompts, monkeypatch):
    """Every step runs bucket(running rows): 5 rows start in bucket 8, which shrinks as rows stop."""
    buckets = []
    step = static_decode.StaticDecoder.step

    def spy(self):
        buckets.append(self.b)
        return step(self)

    monkeypatch.setattr(static_decode.StaticDecoder, "step", spy)
    batch = prompts + prompts[:1]
    out = extend(adapter, [(None, p) for p in batch], MAX_NEW, stop_token_ids(tok, adapter), decode="graph")
    lengths = [len(t) for t in out.tokens]
    # decode step s (1-based) produces token s + 1 of the rows that have one
    assert buckets == [bucket(sum(n > s for n in lengths)) for s in range(1, max(lengths))]
    assert buckets[0] == 8 and buckets[-1] < 8, "the bucket must shrink in this batch"


def test_graph_decode_with_eager_attention_equals_eager(tok, prompts, device):
    """The additive mask the eager attention implementation takes."""
    adapter = ModelAdapter(tiny_model("qwen2", vocab_size=len(tok), device=device, attn_implementation="eager"))
    assert adapter.model.config._attn_implementation == "eager"
    stop = stop_token_ids(tok, adapter)
    want = extend(adapter, [(None, p) for p in prompts], MAX_NEW, stop, return_hidden=True, decode="eager")
    got = extend(adapter, [(None, p) for p in prompts], MAX_NEW, stop, return_hidden=True, decode="graph")
    assert_same_generation(got, want)


def test_graph_decode_refuses_what_it_cannot_run(tok, prompts):
    sliding = ModelAdapter(
        tiny_model("qwen2", vocab_size=len(tok), use_sliding_window=True, sliding_window=4, max_window_layers=0)
    )
    with pytest.raises(ValueError, match="full attention.*sliding_attention.*decode='eager'"):
        generate(sliding, tok, prompts, 4, decode="graph")
    generate(sliding, tok, prompts, 4, decode="eager")
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(sliding, tok, prompts, 4, decode="cuda-graph")


def test_compiled_decode_equals_eager(tok, prompts):
    """decode="compiled" (the static step through torch.compile, weights frozen) on the CPU: 6 rows in bucket 8 that
    shrinks as rows stop, kept prefixes; the same tokens, hidden states and caches as the eager steps, and a second
    call with the same shapes gives the same again (from the compiled steps of the first)."""
    adapter = ModelAdapter(tiny_model("qwen2", vocab_size=len(tok)))
    batch = (prompts * 2)[:6]
    stop = stop_token_ids(tok, adapter)
    kw = dict(return_hidden=True, keep_prefix=[len(p) + 3 for p in batch])
    want = extend(adapter, [(None, p) for p in batch], MAX_NEW, stop, decode="eager", **kw)
    assert len({len(t) for t in want.tokens}) > 1, "the rows must stop at different steps"
    for _ in range(2):
        assert_same_generation(
            extend(adapter, [(None, p) for p in batch], MAX_NEW, stop, decode="compiled", **kw), want
        )


def test_compiled_decode_buffers_and_devices():
    assert [static_decode.static_capacity(c, "compiled") for c in (1, 256, 257)] == [256, 256, 512]
    assert [static_decode.static_capacity(c, "graph") for c in (1, 16, 17)] == [16, 16, 32]
    on_gpu = SimpleNamespace(device=torch.device("cuda"))  # all the check reads before it refuses
    with pytest.raises(ValueError, match="decode='compiled' runs on the CPU only.*cuda.*decode='graph'"):
        static_decode.check_graph_support(on_gpu, "compiled")


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 64, 128]
    with pytest.raises(ValueError, match="at least one row"):
        bucket(0)


def test_eager_is_the_default_decode_until_a_gpu_verifies_the_graph_path():
    assert default_decode("cpu") == "eager"
    assert default_decode("cuda") == "eager"


@pytest.mark.parametrize("decode", ["eager", "graph"])
def test_logits_only_for_the_last_position(adapter, tok, prompts, decode, monkeypatch):
    """The prefill and every step compute logits for one position per row, never for the whole sequence; the
    model's own LM-head forward (which would make logits for every position) never runs."""
    shapes = []
    logits = adapter.logits
    monkeypatch.setattr(adapter, "logits", lambda h: shapes.append(tuple(h.shape)) or logits(h))
    head = adapter.model.get_output_embeddings().register_forward_hook(lambda *args: shapes.append("lm_head"))
    try:
        out = generate(adapter, tok, prompts, MAX_NEW, decode=decode)
    finally:
        head.remove()
    rows = bucket(len(prompts)) if decode == "graph" else len(prompts)
    assert shapes[0] == (len(prompts), adapter.hidden_size)  # the prefill: one row per prompt
    assert all(s != "lm_head" and len(s) == 2 and s[0] <= rows for s in shapes)
    if not (decode == "graph" and adapter.device.type == "cuda"):  # replayed graphs call no Python
        assert len(shapes) == max(len(t) for t in out.tokens)


CUDA_DEVICES = [d for d in DEVICES if d != "cpu"]
if CUDA_DEVICES:  # generated only where a GPU is present (no skipped cases elsewhere)

    @pytest.mark.parametrize("decode", ["eager", "graph"])
    @pytest.mark.parametrize("arch", ["qwen2", "llama"])
    @pytest.mark.parametrize("cuda", CUDA_DEVICES)
    def test_float32_on_cuda_equals_cpu(tok, prompts, cuda, arch, decode):
        """The same math on both devices: the same tokens; hidden states equal up to the kernels' rounding."""
        cpu = ModelAdapter(tiny_model(arch, vocab_size=len(tok)))
        gpu = ModelAdapter(tiny_model(arch, vocab_size=len(tok), device=cuda))
        want = generate(cpu, tok, prompts, MAX_NEW, return_hidden=True, decode="eager")
        got = generate(gpu, tok, prompts, MAX_NEW, return_hidden=True, decode=decode)
        assert got.tokens == want.tokens
        for g, w in zip(got.hidden, want.hidden, strict=True):
            torch.testing.assert_close(g.cpu(), w, atol=1e-4, rtol=1e-4)
