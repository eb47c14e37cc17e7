"""The sm_90a kernel (csrc/cuda/sm90.cuh, LATENTSEEK_CUDA_KERNEL=sm90), judged by tests/checking.py like the other
CUDA kernels, on shapes that give every cluster size (1 to 8 CTAs splitting H), odd and even chunk counts, several
token tiles and vocabulary splits. The kernel-specific hazard gets its own test: every CTA of a cluster must reach
bitwise the same logits, hence the same argmax, or the gradient's H slices would use different W[x] rows; with exact
and near ties that shows as a difference between the argmax call and the same call given the argmax's tokens.

Runs only on a compute capability 9.0 GPU with a build that has sm_90a code; elsewhere the one test that runs checks
that forcing the kernel is an error that says why. (Auto never takes this kernel until these tests and
compute-sanitizer have passed on a GPU.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import latentseek_ext
from checking import check_policy_grad
from latentseek_ext import reference

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the sm90 kernel's tests need one", allow_module_level=True)
if not latentseek_ext.extension_available("cuda"):
    pytest.skip("latentseek_ext was built without its CUDA kernel", allow_module_level=True)

pytestmark = pytest.mark.cuda
DEV = "cuda"
HOPPER = torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the sm90 kernel needs a compute capability 9.0 GPU")
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def sm90(monkeypatch):
    monkeypatch.setenv("LATENTSEEK_CUDA_KERNEL", "sm90")
    monkeypatch.setenv("LATENTSEEK_CUDA_TILES", "auto")


def ext(hidden, weight, reward=None, tokens=None, bias=None):
    return latentseek_ext.lm_head_policy_grad(hidden, weight, reward, tokens, bias, impl="ext")


def make_inputs(n, h, v, dtype, *, seed=0, peaked=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(n, h, generator=g, dtype=torch.float64) / h**0.5 * 4
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    if peaked:  # half of W's rows are scaled copies of rows of z: p(x) -> 1, ties between the copies
        rows = torch.randperm(v, generator=g)[: v // 2]
        w[rows] = z[torch.randint(0, n, (rows.numel(),), generator=g)] * 2
    return z.to(dtype).to(DEV), w.to(dtype).to(DEV)


# (N, H, V): cluster x chunks per CTA = 1 x 1, 1 x 4 (last chunk partial), 2 x 7 (Qwen2.5-0.5B's H), 2 x 5 (odd:
# a consumer warpgroup repeats a chunk), 3 x 6, 3 x 8, 7 x 8 (7B's H), 8 x 8 (the largest); N from 1 to 3 token tiles.
SHAPES = [
    (1, 64, 1000),
    (7, 200, 5003),
    (37, 896, 4099),
    (65, 520, 700),
    (3, 1096, 2100),
    (130, 1536, 3001),
    (64, 3584, 2500),
    (5, 4096, 777),
]


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("peaked", [False, True], ids=["random", "peaked"])
def test_matches_float64_truth(dtype, shape, peaked):
    n, h, v = shape
    hidden, weight = make_inputs(n, h, v, dtype, seed=n + h + v, peaked=peaked)
    check_policy_grad(ext, hidden, weight, torch.randn(n, device=DEV))


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_given_tokens_bias_and_reward_forms(dtype):
    n, h, v = 70, 896, 3001
    hidden, weight = make_inputs(n, h, v, dtype, seed=3)
    g = torch.Generator(device="cpu").manual_seed(4)
    tokens = torch.randint(0, v, (n,), generator=g).to(DEV)
    bias = (torch.randn(v, generator=g) * 0.5).to(dtype).to(DEV)
    for reward in (torch.randn(n, device=DEV), torch.tensor(-0.5, device=DEV), 0.75):
        check_policy_grad(ext, hidden, weight, reward, tokens, bias)


@needs_hopper
def test_logprob_without_gradient():
    n, h, v = 33, 1536, 2049
    hidden, weight = make_inputs(n, h, v, torch.bfloat16, seed=5)
    tokens = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(5)).to(DEV)
    x, logp = latentseek_ext.lm_head_logprob(hidden, weight, tokens, impl="ext")  # no grad: the no-gradient kernel
    _, logp_t, _ = reference.lm_head_policy_grad(hidden.double(), weight.double(), -1.0, tokens)
    assert torch.equal(x, tokens)
    torch.testing.assert_close(logp.double(), logp_t, rtol=0, atol=2e-2)


@needs_hopper
@pytest.mark.parametrize("h", [896, 1536, 3584])
def test_cluster_ctas_agree_on_near_ties(h):
    # Each row's largest logits come in pairs of W rows: exact copies (the tie must go to the lower index) and
    # copies one bf16 step apart in one element (a near tie that only the rounding of the summed partial logits
    # decides). The pairs straddle tiles, splits and the cluster's H slices. If any CTA of a cluster took another
    # token than the rest, its slice of the gradient would use another W row than the token returned; the same call
    # given the returned tokens computes everything else identically, so the two gradients must be bitwise equal.
    n, v = 96, 151936 // 8
    hidden, weight = make_inputs(n, h, v, torch.bfloat16, seed=h)
    g = torch.Generator(device="cpu").manual_seed(h + 1)
    top = torch.randperm(v, generator=g)[: 2 * n].view(n, 2).sort(dim=1).values.to(DEV)
    for row in range(n):
        lo, hi = int(top[row, 0]), int(top[row, 1])
        weight[lo] = (hidden[row].double() * 3).to(torch.bfloat16)
        weight[hi] = weight[lo]
        if row % 2:  # near tie: one element one bf16 step larger in magnitude
            k = row % h
            weight[hi, k] = weight[lo, k] * (1 + 2**-7)
    reward = torch.randn(n, device=DEV)
    x, logp, grad = ext(hidden, weight, reward)
    x2, logp2, grad2 = ext(hidden, weight, reward, x)
    assert torch.equal(x2, x)
    assert torch.equal(grad, grad2), "the CTAs of a cluster disagree on a token"
    assert torch.equal(logp, logp2)
    exact = torch.arange(n, device=DEV) % 2 == 0
    assert torch.equal(x[exact], top[exact, 0]), "an exact tie goes to the lower index"
    assert bool(((x == top[:, 0]) | (x == top[:, 1]))[~exact].all())
    check_policy_grad(ext, hidden, weight, reward)


@needs_hopper
def test_deterministic():
    hidden, weight = make_inputs(50, 896, 9000, torch.bfloat16, seed=8)
    first = ext(hidden, weight, 1.0)
    for _ in range(3):
        again = ext(hidden, weight, 1.0)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


_BAD_TOKEN_SCRIPT = """
import os, sys, torch, latentseek_ext
os.environ["LATENTSEEK_CUDA_KERNEL"] = "sm90"
hidden = torch.randn(5, 64, device="cuda").to(torch.bfloat16)
weight = torch.randn(2000, 64, device="cuda").to(torch.bfloat16)
tokens = torch.zeros(5, dtype=torch.int64, device="cuda")
tokens[1] = 2000
latentseek_ext.lm_head_policy_grad(hidden, weight, None, tokens, impl="ext")
print("call returned", flush=True)
try:
    torch.cuda.synchronize()
except RuntimeError as e:
    print("sync error:", e, flush=True)
    sys.exit(3)
"""


@needs_hopper
def test_out_of_range_token_fails_at_the_next_sync():
    proc = subprocess.run([sys.executable, "-c", _BAD_TOKEN_SCRIPT], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "call returned" in proc.stdout and "device-side assert" in out, out
    assert "tokens must lie in [0, V)" in out, out


@pytest.mark.skipif(HOPPER, reason="this GPU runs the kernel")
def test_forcing_it_elsewhere_is_an_error_that_says_why():
    hidden, weight = make_inputs(4, 64, 500, torch.bfloat16)
    with pytest.raises(RuntimeError, match="LATENTSEEK_CUDA_KERNEL=sm90 needs a compute capability 9.0 GPU"):
        ext(hidden, weight)
