"""Small calls of every CUDA kernel path of latentseek_ext, for compute-sanitizer (memcheck, racecheck, synccheck,
initcheck); benchmarks/gpu_session.sh runs it under each tool.

Paths, each with the large tiles and the small-shared-memory tiles of the tensor-core kernel
(LATENTSEEK_CUDA_TILES=small): the tensor-core kernel with vocabulary splits (then the merge kernel) and with one
split (its own finish, which needs enough rows to fill the GPU), with and without the gradient, several H slices;
the chunked path (cuBLAS products, the per-chunk row kernel, its finish kernel), also with the op's options (temperature,
sampling, entropy, top-k: the options' row kernel, in every dtype); the SIMT kernel
in fp32 / fp64 and as the bf16 fallback (H % 8 != 0); last, on a compute capability 9.0 GPU, the sm_90a kernel
(LATENTSEEK_CUDA_KERNEL=sm90: clusters of 1, 2 and 3 CTAs, vocabulary splits with the merge, and one split with its
own finish), so that a hang there cannot hide the other paths' results. Across them: given tokens, bias, and the three reward forms
(per row, a 0-d tensor, a float). Shapes are odd on purpose (rows, H and V not multiples of the tiles). Each call
prints one line; the script exits non-zero if an output is not finite where it must be, or a token out of range.

    python benchmarks/sanitizer_case.py [--device cuda|cpu]

--device cpu runs the same calls on the CPU kernel (the LATENTSEEK_CUDA_* variables are then ignored), so the
script itself is tested without a GPU (tests/test_gpu_scripts.py).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import latentseek_ext

DEVICE = "cuda"
CALLS = 0


def run(
    kernel: str,
    n: int,
    h: int,
    v: int,
    dtype: torch.dtype,
    *,
    with_extras: bool,
    grad: bool = True,
    tiles: str = "auto",
    reward_form: str = "rows",
) -> None:
    global CALLS
    os.environ["LATENTSEEK_CUDA_KERNEL"] = kernel
    os.environ["LATENTSEEK_CUDA_TILES"] = tiles
    g = torch.Generator(device="cpu").manual_seed(n * 7 + h * 3 + v)
    z = (torch.randn(n, h, generator=g) / h**0.5).to(dtype).to(DEVICE)
    w = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).to(DEVICE)
    tokens = torch.randint(0, v, (n,), generator=g).to(DEVICE) if with_extras else None
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype).to(DEVICE) if with_extras else None
    reward = {
        "rows": torch.randn(n, generator=g).to(DEVICE),
        "scalar": torch.tensor(-0.5).to(DEVICE),
        "float": 0.75,
        "none": None,
    }[reward_form if with_extras else "none"]
    if grad:
        x, logp, out = latentseek_ext.lm_head_policy_grad(z, w, reward, tokens, bias, impl="ext")
    else:
        logp, x, out = torch.ops.latentseek_ext.lm_head_logprob.default(z, w, tokens, bias, False)  # logp leads
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    ok = bool(torch.isfinite(logp).all()) and bool(torch.isfinite(out).all()) and bool(((x >= 0) & (x < v)).all())
    CALLS += 1
    extras = f"extras={with_extras}" + (f" reward={reward_form}" if with_extras else "")
    print(
        f"{kernel:8s} tiles={tiles:5s} {str(dtype):15s} N={n:5d} H={h:4d} V={v:5d} {extras} grad={grad}: "
        f"{'ok' if ok else 'NOT FINITE'}",
        flush=True,
    )
    if not ok:
        sys.exit(1)


def run_options(n: int, h: int, v: int, dtype: torch.dtype) -> None:
    """One call with every option of the op (temperature, Gumbel sampling with offsets, entropy, top-k) and a bias."""
    global CALLS
    os.environ["LATENTSEEK_CUDA_KERNEL"] = "auto"
    os.environ["LATENTSEEK_CUDA_TILES"] = "auto"
    g = torch.Generator(device="cpu").manual_seed(n * 5 + h + v)
    z = (torch.randn(n, h, generator=g) / h**0.5).to(dtype).to(DEVICE)
    w = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).to(DEVICE)
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype).to(DEVICE)
    offsets = torch.arange(100, 100 + n, dtype=torch.int64).to(DEVICE)
    x, logp, out, entropy, topk_logp, topk_tokens = latentseek_ext.lm_head_policy_grad(
        z,
        w,
        torch.randn(n, generator=g).to(DEVICE),
        None,
        bias,
        temperature=0.7,
        sample=True,
        seed=1234,
        offsets=offsets,
        entropy=True,
        topk=4,
        impl="ext",
    )
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    ok = all(bool(torch.isfinite(t).all()) for t in (logp, out, entropy, topk_logp))
    ok = ok and bool(((x >= 0) & (x < v)).all()) and bool(((topk_tokens >= 0) & (topk_tokens < v)).all())
    CALLS += 1
    print(
        f"options  {str(dtype):15s} N={n:5d} H={h:4d} V={v:5d} T=0.7 sample entropy topk=4: "
        f"{'ok' if ok else 'NOT FINITE'}",
        flush=True,
    )
    if not ok:
        sys.exit(1)


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    DEVICE = ap.parse_args().device
    assert latentseek_ext.extension_available(DEVICE), f"latentseek_ext was built without its {DEVICE} kernel"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 4
    for tiles in ("large", "small"):
        for dtype in (torch.bfloat16, torch.float16):
            run("fused", 37, 200, 1000, dtype, with_extras=True, tiles=tiles)  # splits + merge, 1 H slice
            run("fused", 5, 1096, 700, dtype, with_extras=False, tiles=tiles)  # 3 H slices, the last one partial
            run("fused", 9, 136, 650, dtype, with_extras=True, grad=False, tiles=tiles)
        # One split: at least 2 CTAs per SM of 32 rows (one H slice), so the kernel finishes the rows itself.
        run("fused", 64 * sms + 3, 72, 300, torch.bfloat16, with_extras=True, tiles=tiles, reward_form="scalar")
    for dtype in (torch.bfloat16, torch.float16):
        run("chunked", 13, 72, 1100, dtype, with_extras=True, reward_form="float")
        run("chunked", 13, 72, 1100, dtype, with_extras=False, grad=False)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        run_options(13, 72, 1100, dtype)  # any option takes the chunked path, whatever LATENTSEEK_CUDA_KERNEL says
    run("simt", 21, 100, 900, torch.bfloat16, with_extras=True)  # H % 8 != 0: the fallback
    run("simt", 19, 600, 500, torch.float32, with_extras=True, reward_form="float")  # 2 H slices
    run("simt", 7, 64, 333, torch.float64, with_extras=True, grad=False)
    run("simt", 7, 300, 333, torch.float64, with_extras=True, reward_form="scalar")
    if DEVICE == "cpu" or torch.cuda.get_device_capability() == (9, 0):
        for dtype in (torch.bfloat16, torch.float16):
            run("sm90", 37, 896, 1000, dtype, with_extras=True)  # cluster of 2, splits + merge
            run("sm90", 5, 1096, 700, dtype, with_extras=False)  # cluster of 3, the last CTA's chunks partly past H
            run("sm90", 70, 136, 650, dtype, with_extras=True, grad=False)  # 2 token tiles, no gradient
        # One split: more 64-row token tiles than clusters fit at once, so the kernel finishes the rows itself.
        run("sm90", 64 * sms + 3, 72, 300, torch.bfloat16, with_extras=True, reward_form="scalar")
    else:
        print("sanitizer_case: sm90 calls left out (they need a compute capability 9.0 GPU)", file=sys.stderr)
    print(f"sanitizer_case: done, {CALLS} calls")


if __name__ == "__main__":
    main()
