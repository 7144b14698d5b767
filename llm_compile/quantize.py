"""Weight-only INT4/INT8 quantization: ``quantize_weights`` swaps ``nn.Linear`` for :class:`QuantLinear`.

Two formats, per output row, groups of ``group_size`` (32, 64, 128, ...) along K:

* **symmetric** (``symmetric=True``, default)::

    scale[n, g] = max(|W[n, g*gs:(g+1)*gs]|) / qmax        qmax = 7 (INT4) or 127 (INT8)
    q[n, k]     = clamp(round(W[n, k] / scale[n, k // gs]), -qmax, qmax)   (0 where scale == 0)
    W_hat[n, k] = q[n, k] * scale[n, k // gs]

* **asymmetric** (``symmetric=False``; GGUF Q4_1, asymmetric GPTQ)::

    mins[n, g]  = min(W[n, group]);  scale[n, g] = (max(W[n, group]) - mins[n, g]) / (2**bits - 1)
    u[n, k]     = clamp(round((W[n, k] - mins) / scale), 0, 2**bits - 1)          (0 where scale == 0)
    W_hat[n, k] = u[n, k] * scale[n, k // gs] + mins[n, k // gs]

Storage (``QuantLinear`` buffers):

* ``qweight``, symmetric: INT8 -> ``int8 [N, K]``; INT4 -> ``uint8 [N, K/2]``, two values per byte,
  offset binary: byte ``b[n, j] = (q[n, 2j] + 8) | ((q[n, 2j+1] + 8) << 4)`` (low nibble = even k;
  GGUF Q4_0's ``d * (nibble - 8)`` is this format).
* ``qweight``, asymmetric: unsigned, no offset: INT8 -> ``uint8 [N, K]``; INT4 -> ``uint8 [N, K/2]``
  with ``b[n, j] = u[n, 2j] | (u[n, 2j+1] << 4)``.
* ``scales`` (and ``mins``, asymmetric only): ``[N, K/gs]`` in ``scale_dtype`` (float32 by default,
  float16 allowed).
* ``bias``: kept as is.

``QuantLinear.forward`` is plain torch: :func:`dequantize_weight` -> ``F.linear``; this is the
pattern the Anda lowering pass (``llm_compile.passes.anda_lowering``) recognises in the ATen graph
and replaces with ``llmaccel::anda_linear``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["QuantLinear", "quantize_weights", "quantize_tensor", "quantize_tensor_asymmetric",
           "dequantize_weight", "pack_int4", "unpack_int4", "pack_uint4", "unpack_uint4"]


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"weight bits must be 4 or 8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def check_quant_args(bits, group_size, scale_dtype=torch.float32) -> None:
    """Argument checks of :func:`quantize_weights` / :func:`quantize_tensor`: a ``TypeError`` or
    ``ValueError`` naming the argument, before any tensor work (no ``ZeroDivisionError`` later)."""
    for name, v in (("bits", bits), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"quantize_weights: {name}={v!r} ({type(v).__name__}) must be an int")
    if bits not in (4, 8):
        raise ValueError(f"quantize_weights: bits={bits!r} must be 4 or 8")
    if group_size < 1:
        raise ValueError(f"quantize_weights: group_size={group_size!r} must be a positive int that "
                         "divides in_features (e.g. 32, 64, 128)")
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise TypeError(f"quantize_weights: scale_dtype={scale_dtype!r} must be a floating torch.dtype "
                        "(torch.float32 or torch.float16)")


def pack_uint4(u: Tensor) -> Tensor:
    """``int [N, K]`` in ``[0, 15]`` (K even) -> ``uint8 [N, K/2]`` (low nibble = even k, no offset)."""
    if u.shape[-1] % 2:
        raise ValueError("INT4 packing needs an even number of columns")
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_uint4(packed: Tensor) -> Tensor:
    """``uint8 [N, K/2]`` -> ``uint8 [N, K]`` in ``[0, 15]`` (low nibble = even k)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def pack_int4(q: Tensor) -> Tensor:
    """``int [N, K]`` in ``[-8, 7]`` (K even) -> ``uint8 [N, K/2]`` (low nibble = even k, offset 8)."""
    return pack_uint4(q.to(torch.int16) + 8)


def unpack_int4(packed: Tensor) -> Tensor:
    """``uint8 [N, K/2]`` -> ``int8 [N, K]`` in ``[-8, 7]``."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1)


def _groups(w: Tensor, group_size: int) -> Tensor:
    n, k = w.shape
    if group_size < 1 or k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of group_size={group_size}")
    return w.detach().to(torch.float32).reshape(n, k // group_size, group_size)


def quantize_tensor(w: Tensor, bits: int = 4, group_size: int = 128,
                    scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Symmetric RTN of a ``[N, K]`` weight; returns ``(qweight, scales)`` in the storage format above."""
    check_quant_args(bits, group_size, scale_dtype)
    qmax = _qmax(bits)
    n, k = w.shape
    wg = _groups(w, group_size)
    scale = (wg.abs().amax(dim=-1) / qmax).to(scale_dtype)
    s32 = scale.to(torch.float32).unsqueeze(-1)
    q = torch.where(s32 > 0, torch.round(wg / torch.where(s32 > 0, s32, 1.0)), 0.0)
    q = q.clamp(-qmax, qmax).to(torch.int8).reshape(n, k)
    return (pack_int4(q) if bits == 4 else q), scale


def quantize_tensor_asymmetric(w: Tensor, bits: int = 4, group_size: int = 128,
                               scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric (min/max) RTN of a ``[N, K]`` weight; returns ``(qweight, scales, mins)``.

    The integers are rounded against the stored (``scale_dtype``) scale and minimum, so
    ``dequantize_weight`` reproduces ``W`` to half a step of the stored scale.
    """
    check_quant_args(bits, group_size, scale_dtype)
    umax = 2 ** bits - 1
    n, k = w.shape
    wg = _groups(w, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / umax).to(scale_dtype)
    mins = lo.to(scale_dtype)
    s32, m32 = scale.to(torch.float32).unsqueeze(-1), mins.to(torch.float32).unsqueeze(-1)
    u = torch.where(s32 > 0, torch.round((wg - m32) / torch.where(s32 > 0, s32, 1.0)), 0.0)
    u = u.clamp(0, umax).to(torch.uint8).reshape(n, k)
    return (pack_uint4(u) if bits == 4 else u), scale, mins


def dequantize_weight(qweight: Tensor, scales: Tensor, bits: int, group_size: int,
                      dtype: torch.dtype = torch.float32, mins: Tensor | None = None) -> Tensor:
    """``W_hat`` as ``[N, K]`` in ``dtype`` (computed in float32). Plain torch ops only.

    ``mins=None``: symmetric, ``q * scale``; else asymmetric, ``u * scale + mins`` (unsigned ``u``).
    """
    if mins is None:
        q = unpack_int4(qweight) if bits == 4 else qweight
    else:
        q = unpack_uint4(qweight) if bits == 4 else qweight
    n, k = q.shape
    w = q.to(torch.float32).reshape(n, k // group_size, group_size) * scales.to(torch.float32).unsqueeze(-1)
    if mins is not None:
        w = w + mins.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


class QuantLinear(nn.Module):
    """``nn.Linear`` with INT4/INT8 group-quantized weights; forward = dequantize -> ``F.linear``.

    ``symmetric=False`` adds the ``mins`` buffer and stores unsigned integers (module docstring).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, scale_dtype: torch.dtype = torch.float32, device=None,
                 dtype: torch.dtype = torch.float32, symmetric: bool = True):
        super().__init__()
        check_quant_args(bits, group_size, scale_dtype)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        qshape = (out_features, in_features // 2) if bits == 4 else (out_features, in_features)
        qdtype = torch.int8 if bits == 8 and symmetric else torch.uint8
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype, device=device))
        gshape = (out_features, in_features // group_size)
        self.register_buffer("scales", torch.zeros(gshape, dtype=scale_dtype, device=device))
        self.register_buffer("mins", None if symmetric else torch.zeros(gshape, dtype=scale_dtype,
                                                                        device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int = 4, group_size: int = 128,
                    scale_dtype: torch.dtype = torch.float32, symmetric: bool = True) -> "QuantLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, bits, group_size, scale_dtype,
                device=lin.weight.device, dtype=lin.weight.dtype, symmetric=symmetric)
        if symmetric:
            q, s = quantize_tensor(lin.weight, bits, group_size, scale_dtype)
        else:
            q, s, mn = quantize_tensor_asymmetric(lin.weight, bits, group_size, scale_dtype)
            m.mins.copy_(mn)
        m.qweight.copy_(q)
        m.scales.copy_(s)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_weight(self.qweight, self.scales, self.bits, self.group_size,
                                 dtype or (self.bias.dtype if self.bias is not None else torch.float32),
                                 self.mins)

    def forward(self, x: Tensor) -> Tensor:
        w = dequantize_weight(self.qweight, self.scales, self.bits, self.group_size, x.dtype, self.mins)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


def quantize_weights(model: nn.Module, bits: int = 4, group_size: int = 128,
                     skip: tuple[str, ...] = ("lm_head",),
                     scale_dtype: torch.dtype = torch.float32, symmetric: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`QuantLinear`.

    A linear is skipped when any name in ``skip`` is a component of its qualified name (e.g.
    ``"lm_head"``), or when ``in_features`` is not a multiple of ``group_size`` (one warning in all;
    e.g. SmolLM2's hidden size 576 = 4.5 * 128 leaves its q/k/v/o/gate/up projections in float with
    ``group_size=128``; 64 fits every linear). Returns the model; ``model.llmaccel_quantized`` lists
    the replaced module names, ``model.llmaccel_skipped`` those left in float for that reason.
    ``symmetric=False``: asymmetric (min/max) groups, see the module docstring.
    """
    check_quant_args(bits, group_size, scale_dtype)
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"quantize_weights: skip={skip!r} must be a tuple of module names, e.g. ('lm_head',)")
    if not isinstance(symmetric, bool):
        raise TypeError(f"quantize_weights: symmetric must be a bool, got {symmetric!r}")
    done, misfit = [], []
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        parts = name.split(".")
        if any(s in parts for s in skip):
            continue
        if mod.in_features % group_size:
            misfit.append(name)
            continue
        parent = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
        setattr(parent, parts[-1], QuantLinear.from_linear(mod, bits, group_size, scale_dtype, symmetric))
        done.append(name)
    if misfit:  # one warning, not one per layer (SmolLM2 + group 128 would print 180 lines)
        log.warning("quantize_weights: %d linears left in float: in_features not a multiple of "
                    "group_size=%d (e.g. %s)", len(misfit), group_size, ", ".join(misfit[:3]))
    model.llmaccel_quantized = done
    model.llmaccel_skipped = misfit
    log.info("quantize_weights: %d linears -> INT%d (group %d, %s)", len(done), bits, group_size,
             "symmetric" if symmetric else "asymmetric")
    return model
