"""Weight-only quantised linears on torch's own CPU kernels, for faster decoding on a CPU.

Decoding one sequence reads every weight once per token, so on a CPU its speed is bounded by the bytes of weights
read. :func:`quantize_weights` replaces the ``nn.Linear`` modules of a causal LM's decoder layers with

- ``"int8"``: :class:`Int8Linear`, int8 weights with one scale per output channel,
  ``W[n, k] = q[n, k] * s[n]``, run by ``torch.ops.aten._weight_int8pack_mm``;
- ``"int4"``: :class:`Int4Linear`, 4-bit weights with a scale and a zero per group of ``group_size`` consecutive
  inputs of an output channel, ``W[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g]`` (g = k // group_size, q in 0..15),
  packed by ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` and run by
  ``torch.ops.aten._weight_int4pack_mm_for_cpu``;

and gives the model a quantised copy of its LM head for picking tokens (:data:`DECODE_HEAD`). The dense LM head
stays in place: :class:`~latentseek.model.ModelAdapter` keeps its dense ``W`` for the LatentSeek op (the gradient
of z is taken through the dense ``W h + b``) and for ``model(...).logits``, and picks decoded tokens from the
quantised copy (:meth:`~latentseek.model.ModelAdapter.logits`). The input embedding stays dense (a decode step reads
one row of it).

The kernels take bfloat16 activations (their float32 paths are a slow reference), so a quantised linear computes in
bfloat16 and returns its input's dtype. The scale and zero are rounded to bfloat16 before the weights are rounded
to them, so each weight is the nearest grid point of the grid the kernel uses: ``|W - dequantised| <= s / 2``.
CPU only: the packed int4 layout is the CPU kernel's.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

#: The weights :func:`quantize_weights` (and ``load_model(weights=...)``, ``--weights``) offers; ``"dense"`` leaves
#: the model as loaded.
Weights = Literal["dense", "int8", "int4"]
WEIGHTS: tuple[Weights, ...] = get_args(Weights)

#: Group sizes the int4 CPU kernel accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)
#: The int4 CPU kernel packs output channels in blocks of this many.
INT4_OUT_MULTIPLE = 16
#: The default int4 group size (``benchmarks/bench_generate.py --weights int4gN`` measures another).
INT4_GROUP_SIZE = 32

#: The attribute under which :func:`quantize_weights` registers the quantised LM head on the model; the adapter
#: decodes with it when present.
DECODE_HEAD = "latentseek_decode_head"

# The kernels' activation dtype.
_COMPUTE = torch.bfloat16


class _WeightOnlyLinear(torch.nn.Module):
    """A linear layer ``y = x W^T + b`` whose W is stored quantised; ``x`` of any float dtype, ``y`` in that dtype."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] bf16 -> [M, N] bf16
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The weight ``[N, K]`` the kernel multiplies by, in float32."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features).to(_COMPUTE).contiguous()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class Int8Linear(_WeightOnlyLinear):
    """Int8 weights ``q [N, K]`` with a bfloat16 scale per output channel ``s [N]``: ``W = q * s[:, None]``."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias)
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(_COMPUTE)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def int4_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantisation of ``weight [N, K]`` in groups of ``group_size`` along K.

    Each group's range ``[min, max]`` maps onto the levels 0..15: ``s = (max - min) / 15`` and ``z = min + 8 s``
    (both rounded to bfloat16), ``q = clamp(round((w - z) / s) + 8, 0, 15)``.

    Returns:
        ``q`` int32 ``[N, K]`` in 0..15, and ``scales_and_zeros`` bfloat16 ``[K / group_size, N, 2]`` (the layout of
        ``_weight_int4pack_mm_for_cpu``).
    """
    n, k = weight.shape
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        raise ValueError(
            f"group_size must be one of {INT4_GROUP_SIZES} and divide the weight's {k} inputs, got {group_size}"
        )
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(_COMPUTE).tiny).to(_COMPUTE).float()
    zero = (lo + 8 * scale).to(_COMPUTE).float()
    q = torch.round((w - zero[..., None]) / scale[..., None]).add_(8).clamp_(0, 15).to(torch.int32).reshape(n, k)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(_COMPUTE)


class Int4Linear(_WeightOnlyLinear):
    """4-bit weights in groups of ``group_size`` inputs (:func:`int4_quantize`), packed for the CPU kernel."""

    def __init__(self, linear: torch.nn.Linear, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias)
        q, scales_and_zeros = int4_quantize(linear.weight, group_size)
        self.group_size = group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def dequantized(self) -> torch.Tensor:
        # the kernel applied to the identity: exact, as each output is one weight times 1 (in bfloat16)
        eye = torch.eye(self.in_features, dtype=_COMPUTE)
        return self._matmul(eye).float().T.contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"


def _quantized(linear: torch.nn.Linear, weights: Weights, group_size: int) -> torch.nn.Module | None:
    """The quantised replacement of ``linear``, or None where the kernel cannot take its shape."""
    if weights == "int8":
        return Int8Linear(linear)
    if linear.in_features % group_size or linear.out_features % INT4_OUT_MULTIPLE:
        return None
    return Int4Linear(linear, group_size)


def quantize_weights(model: torch.nn.Module, weights: Weights, *, group_size: int = INT4_GROUP_SIZE) -> list[str]:
    """Replace, in place, the ``nn.Linear`` modules of ``model``'s decoder with weight-only quantised ones, and
    register a quantised copy of its LM head as ``model.latentseek_decode_head`` (:data:`DECODE_HEAD`).

    Args:
        model: a transformers causal LM on the CPU (``get_decoder()``, ``get_output_embeddings()``).
        weights: ``"int8"`` or ``"int4"`` (``"dense"`` returns at once).
        group_size: inputs per int4 group, one of :data:`INT4_GROUP_SIZES` (int4 only). A linear whose inputs are
            not a multiple of it, or whose outputs are not a multiple of :data:`INT4_OUT_MULTIPLE`, stays dense.

    Returns:
        the names of the linears left dense (empty for the usual shapes).

    Raises:
        ValueError: an unknown ``weights`` or ``group_size``, a model not on the CPU, or one quantised already.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if weights == "dense":
        return []
    if hasattr(model, DECODE_HEAD):
        raise ValueError(f"the model's weights are quantised already ({DECODE_HEAD} is set); load it again")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(
            f"weight-only {weights} runs on torch's CPU kernels, but the model is on {sorted(devices)}; load it on cpu"
        )
    decoder = model.get_decoder()
    dense: list[str] = []
    for name, module in list(decoder.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        replacement = _quantized(module, weights, group_size)
        if replacement is None:
            dense.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(decoder.get_submodule(parent_name), child, replacement)
    head = model.get_output_embeddings()
    decode_head = _quantized(head, weights, group_size) if isinstance(head, torch.nn.Linear) else None
    if decode_head is None:
        dense.append("lm_head")
    setattr(model, DECODE_HEAD, decode_head)  # None: decoding reads the dense head
    return dense


def weights_of(model: torch.nn.Module) -> str:
    """What a run's config records of the model's weights: ``"dense"``, ``"int8"``, or ``"int4-g{group_size}"``
    (the quantised linears' kind, read from the modules :func:`quantize_weights` put in)."""
    kinds = sorted(
        {
            f"int4-g{m.group_size}" if isinstance(m, Int4Linear) else "int8"
            for m in model.modules()
            if isinstance(m, (Int4Linear, Int8Linear))
        }
    )
    return "+".join(kinds) if kinds else "dense"


def decode_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The quantised LM head :func:`quantize_weights` registered on ``model``, or None."""
    return getattr(model, DECODE_HEAD, None)
