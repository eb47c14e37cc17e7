"""The CPU kernel's paths for 16-bit inputs (csrc/include/latentseek/cpu_paths.h): the run-time dispatch on the CPU's
capability, the LATENTSEEK_CPU_PATH override, and the float64-truth checks (tests/checking.py) on every path this
machine can run. Paths it cannot run are tested for their refusal instead; none is skipped.

    widen  bf16/fp16 tiles widened to fp32, ATen's fp32 GEMM (every CPU)
    bf16   bf16 matrix units (AMX-BF16 / AVX512-BF16) through oneDNN's brgemm, fp32 accumulation and output
    fp16   the same on fp16 matrix units (AMX-FP16)
"""

from __future__ import annotations

import math

import pytest
import torch

import latentseek_ext
from checking import check_outputs, check_policy_grad, judge, revealing_inputs
from latentseek_ext import lm_head_logprob, lm_head_policy_grad

pytestmark = pytest.mark.skipif(not latentseek_ext.extension_available("cpu"), reason="extension not built")

ENV = "LATENTSEEK_CPU_PATH"
PATHS = ("widen", "bf16", "fp16")
#: The input dtypes each path serves.
SERVES = {"widen": (torch.bfloat16, torch.float16), "bf16": (torch.bfloat16,), "fp16": (torch.float16,)}


def available() -> list[str]:
    return list(torch.ops.latentseek_ext.cpu_paths()) if latentseek_ext.extension_available("cpu") else ["widen"]


SUPPORTED = available()
UNSUPPORTED = [p for p in PATHS if p not in SUPPORTED]
#: (path, dtype) for every path this machine runs and every dtype it serves.
RUNNABLE = [(p, dt) for p in SUPPORTED for dt in SERVES[p]]


def ids(case: tuple[str, torch.dtype]) -> str:
    return f"{case[0]}-{str(case[1]).replace('torch.', '')}"


@pytest.fixture(params=RUNNABLE, ids=[ids(c) for c in RUNNABLE])
def forced(request, monkeypatch) -> tuple[str, torch.dtype]:
    """(path, dtype) with LATENTSEEK_CPU_PATH set to the path for the test."""
    path, dtype = request.param
    monkeypatch.setenv(ENV, path)
    assert torch.ops.latentseek_ext.cpu_path(dtype) == path
    return path, dtype


def ext(hidden, weight, reward=None, tokens=None, bias=None):
    return lm_head_policy_grad(hidden, weight, reward, tokens, bias, impl="ext")


def make(N, H, V, dtype, scale=1.0, bias=False):
    """Inputs whose logits spread over a few units (as tests/test_op.py)."""
    hidden = (torch.randn(N, H, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(V, H, dtype=torch.float64) * (2.0 / math.sqrt(H))).to(dtype)
    b = torch.randn(V, dtype=torch.float64).to(dtype) if bias else None
    return hidden, weight, b


# --- the dispatch ----------------------------------------------------------------------------------------------


def _has_units(caps, kind: str) -> bool:
    """bf16: AMX-BF16 or AVX512-BF16; fp16: AMX-FP16 only (AVX512-FP16 alone widens, see cpu_paths.h)."""
    avx512 = all(caps.get(k, False) for k in ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq"))
    amx = caps.get("amx_tile", False) and caps.get(f"amx_{kind}", False)
    return avx512 and (amx or (kind == "bf16" and caps.get("avx512_bf16", False)))


def test_available_paths_follow_the_cpu_capability():
    # torch's own capability query is the oracle: a CPU with bf16 (fp16) matrix units must offer that path, so a
    # units path whose self-test failed on such a CPU (and would silently widen) fails here.
    caps = torch.cpu.get_capabilities()
    want = ["widen"] + [kind for kind in ("bf16", "fp16") if _has_units(caps, kind)]
    print(f"CPU capability: {dict((k, v) for k, v in caps.items() if 'avx512' in k or 'amx' in k)}; paths {SUPPORTED}")
    assert SUPPORTED == want


def test_auto_takes_the_units_where_present(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    path = torch.ops.latentseek_ext.cpu_path
    assert path(torch.bfloat16) == ("bf16" if "bf16" in SUPPORTED else "widen")
    assert path(torch.float16) == ("fp16" if "fp16" in SUPPORTED else "widen")
    assert path(torch.float32) == "fp32"
    assert path(torch.float64) == "fp64"
    monkeypatch.setenv(ENV, "auto")
    assert path(torch.bfloat16) == ("bf16" if "bf16" in SUPPORTED else "widen")


@pytest.mark.parametrize("name", SUPPORTED)
def test_forced_path_applies_to_the_dtypes_it_serves(monkeypatch, name):
    monkeypatch.delenv(ENV, raising=False)
    automatic = {dt: torch.ops.latentseek_ext.cpu_path(dt) for dt in (torch.bfloat16, torch.float16, torch.float32)}
    monkeypatch.setenv(ENV, name)
    for dt, auto in automatic.items():
        want = name if dt in SERVES[name] else auto
        assert torch.ops.latentseek_ext.cpu_path(dt) == want, (name, dt)


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_a_path_the_cpu_cannot_run_is_refused(monkeypatch, name):
    monkeypatch.setenv(ENV, name)
    hidden, weight, _ = make(3, 16, 40, torch.float32)  # refused whatever the dtype of the call
    with pytest.raises(RuntimeError, match=f"{ENV}={name} needs {name} matrix units.*paths this CPU can run are"):
        ext(hidden, weight)
    with pytest.raises(RuntimeError, match=f"{ENV}={name}"):
        torch.ops.latentseek_ext.cpu_path(torch.bfloat16)


def test_an_unknown_path_is_refused(monkeypatch):
    monkeypatch.setenv(ENV, "amx")
    hidden, weight, _ = make(3, 16, 40, torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"{ENV} must be auto, widen, bf16 or fp16, got 'amx'"):
        ext(hidden, weight)


def test_units_are_off_while_onednn_is_disabled(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with torch.backends.mkldnn.flags(enabled=False, allow_tf32=None):
        assert list(torch.ops.latentseek_ext.cpu_paths()) == ["widen"]
        assert torch.ops.latentseek_ext.cpu_path(torch.bfloat16) == "widen"
        monkeypatch.setenv(ENV, "bf16")
        with pytest.raises(RuntimeError, match="oneDNN is disabled" if "bf16" in SUPPORTED else "no AMX-BF16"):
            torch.ops.latentseek_ext.cpu_path(torch.bfloat16)
        monkeypatch.setenv(ENV, "widen")
        check_policy_grad(ext, *make(5, 32, 700, torch.bfloat16)[:2], -1.0)
    monkeypatch.delenv(ENV)
    assert list(torch.ops.latentseek_ext.cpu_paths()) == SUPPORTED


@pytest.mark.parametrize("name", [p for p in SUPPORTED if p != "widen"])
def test_units_path_really_runs(monkeypatch, name):
    # P rounded to 16 bits changes the gradient's last bits: the units path must not return the widening path's
    # result (it would if the override were ignored).
    dtype = SERVES[name][0]
    hidden, weight, _ = make(6, 64, 1500, dtype)
    monkeypatch.setenv(ENV, "widen")
    widened = ext(hidden, weight)
    monkeypatch.setenv(ENV, name)
    units = check_policy_grad(ext, hidden, weight)
    assert torch.equal(units[0], widened[0])
    assert not torch.equal(units[2], widened[2])


# --- accuracy on every path ------------------------------------------------------------------------------------

# Odd sizes: H odd (the units pad the contracted dimension to even), V not a multiple of the 512-row tile and with
# an odd last tile, N across one and several row blocks.
SHAPES = [(1, 8, 1), (1, 127, 5), (7, 127, 1000), (7, 896, 1029), (300, 127, 32003), (300, 896, 3001)]


@pytest.mark.parametrize(("N", "H", "V"), SHAPES)
def test_matches_float64_truth(forced, N, H, V):
    _, dtype = forced
    hidden, weight, bias = make(N, H, V, dtype, bias=(V % 2 == 1))
    reward = torch.randn(N)
    reward[::3] = 0.0
    check_policy_grad(ext, hidden, weight, reward, None, bias)


def test_given_tokens_and_scalar_reward(forced):
    _, dtype = forced
    hidden, weight, bias = make(9, 96, 2000, dtype, bias=True)
    tokens = torch.randint(0, 2000, (9,))
    check_policy_grad(ext, hidden, weight, 0.75, tokens, bias)


def test_kernel_is_well_inside_the_bound(forced):
    # tests/test_checker.py's revealing inputs (peaked rows, exact ties in different tiles): at most half the bound.
    _, dtype = forced
    hidden, weight, reward, bias = revealing_inputs(dtype)
    verdict = judge(hidden, weight, reward, None, bias, ext(hidden, weight, reward, None, bias))
    print(f"{forced[0]} {dtype}: {verdict}")
    assert verdict.ok, str(verdict)
    assert verdict.worst() <= 0.5, str(verdict)


def test_real_vocabulary_size(forced):
    _, dtype = forced
    hidden, weight, _ = make(5, 896, 151936, dtype)
    check_policy_grad(ext, hidden, weight, -0.5)


def test_many_row_blocks_and_strided_hidden(forced):
    # More rows than one block (512) and hidden rows further apart than H (the packed Z reads them with the stride).
    _, dtype = forced
    hidden, weight, bias = make(1100, 40, 1300, dtype, bias=True)
    wide = torch.zeros(1100, 80, dtype=dtype)
    wide[:, :40] = hidden
    strided = wide[:, :40]
    assert strided.stride() == (80, 1)
    reward = torch.randn(1100)
    got = check_policy_grad(ext, strided, weight, reward, None, bias)
    want = ext(hidden, weight, reward, None, bias)  # the same path on the contiguous copy: the same arithmetic
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_peaked_rows_keep_relative_precision(forced):
    # p(x) -> 1: the gradient vanishes like 1 - p(x); the argmax enters P as exactly 1, so the units' rounding of P
    # does not leave an error of u_16 |W_x| behind (the checker's bound excludes it).
    _, dtype = forced
    hidden, weight, _ = make(4, 64, 3000, dtype)
    for row in range(4):
        weight[100 + 700 * row] = (hidden[row].double() * (25.0 + row) / hidden[row].double().square().sum()).to(dtype)
    tokens, _, _ = check_policy_grad(ext, hidden, weight)
    assert tokens.tolist() == [100 + 700 * row for row in range(4)]


def test_non_finite_rows(forced):
    _, dtype = forced
    hidden, weight, bias = make(6, 32, 900, dtype, bias=True)
    hidden[1, 3] = float("nan")
    hidden[2, 0] = float("inf")
    bias[::2] = float("-inf")  # masked tokens
    tokens, logp, grad = check_policy_grad(ext, hidden, weight, None, None, bias)
    assert torch.isnan(logp[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(logp[[0, 3, 4, 5]]).all() and (tokens[[0, 3, 4, 5]] % 2 == 1).all()


def test_logprob_forward_and_backward(forced):
    # lm_head_logprob without the gradient skips the second product; with it, autograd gets d logp / d hidden.
    _, dtype = forced
    hidden, weight, bias = make(8, 64, 1500, dtype, bias=True)
    x, logp = lm_head_logprob(hidden, weight, None, bias, impl="ext")
    want = ext(hidden, weight, None, None, bias)
    assert torch.equal(x, want[0]) and torch.equal(logp, want[1])
    leaf = hidden.clone().requires_grad_()
    x, logp = lm_head_logprob(leaf, weight, None, bias, impl="ext")
    logp.sum().backward()  # d logp / d hidden: the policy gradient with reward -1, returned in hidden's dtype
    check_outputs(hidden, weight, -1.0, None, bias, (x, logp.detach(), leaf.grad), grad_dtype=dtype)
