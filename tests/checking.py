"""The correctness checker of the fused op: a candidate against a float64 ground truth, with a tolerance set by the
error of the pure-torch reference run in the candidate's own dtype (flash-attention / Cut Cross-Entropy style)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from conftest import ATOL
from latentseek_ext import reference

# Rows whose top-2 float64 logits are closer than this may legitimately pick either token in low precision.
TIE_GAP = {torch.float64: 0.0, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def check_policy_grad(
    impl: Callable,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reward=None,
    tokens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs ``impl(hidden, weight, reward, tokens, bias)`` and asserts it is correct; returns its outputs.

    Tokens: when given they must come back unchanged; when chosen, they must be an argmax of the float64 logits
    (exactly the argmax, lowest index, where the top-2 gap exceeds the dtype's tie gap; by value elsewhere).
    logp and grad are then compared with the float64 truth *for the tokens the candidate chose*: the candidate's
    max error must be <= 2 x the reference's own error in the same dtype + ATOL[dtype].
    """
    dtype = hidden.dtype
    out_tokens, logp, grad = impl(hidden, weight, reward, tokens, bias)
    lead = hidden.shape[:-1]
    assert out_tokens.dtype == torch.int64 and tuple(out_tokens.shape) == tuple(lead)
    acc = reference.acc_dtype(dtype)
    assert logp.dtype == acc and tuple(logp.shape) == tuple(lead)
    assert grad.dtype == acc and tuple(grad.shape) == tuple(hidden.shape)

    def f64(t):
        return None if t is None else (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)

    r64 = reward if not isinstance(reward, torch.Tensor) else f64(reward).cpu()
    h64, w64, b64 = f64(hidden).cpu(), f64(weight).cpu(), f64(bias)
    b64 = None if b64 is None else b64.cpu()
    chosen = out_tokens.cpu()
    if tokens is not None:
        assert torch.equal(chosen, tokens.cpu()), "given tokens must come back unchanged"
    else:
        logits = reference._logits(h64, w64, b64)  # [N, V] float64
        flat = chosen.reshape(-1)
        top = logits.max(-1).values
        picked = logits.gather(1, flat[:, None])[:, 0]
        if logits.shape[1] > 1:
            top2 = logits.topk(2, -1).values
            clear = (top2[:, 0] - top2[:, 1]) > TIE_GAP[dtype]
        else:
            clear = torch.ones_like(top, dtype=torch.bool)
        exact = logits.argmax(-1)
        assert torch.equal(flat[clear], exact[clear]), "argmax differs on rows without a near-tie"
        assert torch.all(picked >= top - TIE_GAP[dtype] - 1e-12), "chosen token is not a maximum of the logits"
    _, logp_gt, grad_gt = reference.lm_head_policy_grad(h64, w64, r64, chosen, b64)
    _, logp_ref, grad_ref = reference.lm_head_policy_grad(
        hidden.cpu(),
        weight.cpu(),
        reward if not isinstance(reward, torch.Tensor) else reward.cpu(),
        chosen,
        None if bias is None else bias.cpu(),
    )
    for name, got, ref, gt in (("logp", logp, logp_ref, logp_gt), ("grad", grad, grad_ref, grad_gt)):
        if gt.numel() == 0:
            continue
        err = (got.cpu().double() - gt).abs().max().item()
        ref_err = (ref.double() - gt).abs().max().item()
        bound = 2 * ref_err + ATOL[dtype]
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (reference error {ref_err:.3e})"
    return out_tokens, logp, grad
