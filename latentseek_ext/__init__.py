"""latentseek_ext: the fused LM-head policy-gradient op of LatentSeek (C++/CUDA kernels + a pure-torch reference).

    tokens, logp, grad = latentseek_ext.lm_head_policy_grad(hidden, weight, reward)

The math and the shapes are in :mod:`latentseek_ext.ops`; :mod:`latentseek_ext.reference` is the definition of
correct and the fallback where the compiled extension is missing.
"""

from . import reference
from .ops import (
    EXTENSION_DEVICES,
    EXTENSION_ERROR,
    IMPLS,
    Impl,
    extension_available,
    lm_head_logprob,
    lm_head_policy_grad,
)
from .reference import acc_dtype

__all__ = [
    "EXTENSION_DEVICES",
    "EXTENSION_ERROR",
    "IMPLS",
    "Impl",
    "acc_dtype",
    "extension_available",
    "lm_head_logprob",
    "lm_head_policy_grad",
    "reference",
]
