"""latentseek_ext: the fused LM-head policy-gradient op of LatentSeek (C++/CUDA kernels + a pure-torch reference).

    tokens, logp, grad = latentseek_ext.lm_head_policy_grad(hidden, weight, reward)

The math and the shapes are in :mod:`latentseek_ext.ops`; :mod:`latentseek_ext.reference` is the definition of
correct and the fallback where the compiled extension is missing.

``LATENTSEEK_REQUIRE_EXT=1`` makes a missing or broken extension an ImportError here instead of a silent fallback:
the CPU kernel must load, and the CUDA kernel too where torch sees a CUDA device. CI sets it (.ci/run), so that an
extension that builds but fails to import fails the run rather than skipping the op's tests.
"""

import os as _os

import torch as _torch

from . import reference
from .ops import (
    EXTENSION_DEVICES,
    EXTENSION_ERROR,
    EXTENSION_OPTIONS_DEVICES,
    IMPLS,
    Impl,
    extension_available,
    lm_head_logprob,
    lm_head_policy_grad,
)
from .reference import acc_dtype


def _require_extension() -> None:
    flag = _os.environ.get("LATENTSEEK_REQUIRE_EXT", "0")
    if flag not in ("0", "1"):
        raise ValueError(f"latentseek_ext: LATENTSEEK_REQUIRE_EXT must be 0 or 1, got {flag!r}")
    if flag == "0":
        return
    wanted = {"cpu"} | ({"cuda"} if _torch.cuda.is_available() else set())
    missing = sorted(wanted - EXTENSION_DEVICES)
    if missing:
        why = f"importing latentseek_ext._C failed: {EXTENSION_ERROR}" if EXTENSION_ERROR else "no kernel registered"
        raise ImportError(
            f"latentseek_ext: LATENTSEEK_REQUIRE_EXT=1 but the compiled kernel is missing for {', '.join(missing)} "
            f"({why}); build it with `pip install --no-build-isolation -e .`"
        ) from EXTENSION_ERROR


_require_extension()

__all__ = [
    "EXTENSION_DEVICES",
    "EXTENSION_ERROR",
    "EXTENSION_OPTIONS_DEVICES",
    "IMPLS",
    "Impl",
    "acc_dtype",
    "extension_available",
    "lm_head_logprob",
    "lm_head_policy_grad",
    "reference",
]
