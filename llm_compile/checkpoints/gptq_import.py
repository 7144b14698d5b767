"""GPTQ import (AutoGPTQ / GPTQModel / optimum layout), lossless, ``desc_act=False`` only.

Per quantized linear ``[N, K]`` (``p = 32 / bits`` values per int32, low bits first)::

    qweight  int32 [K/p, N]   value for k = i*p + j in bits j*bits.. of qweight[i, n]
    qzeros   int32 [K/g, N/p] zero point for n = i*p + j in bits j*bits.. of qzeros[g, i]
                              (checkpoint_format "gptq", the default: stored zero + 1 is the zero)
    scales   fp16  [K/g, N]
    g_idx    int32 [K]        group of each k; must be k // g (desc_act=False)
    W[n, k] = (u[k, n] - zero[k // g, n]) * scale[k // g, n]

Symmetric checkpoints (every zero = 2**(bits-1)) become symmetric ``QuantLinear`` (INT4 nibble = u,
i.e. q + 8; INT8 q = u - 128); the others asymmetric with ``mins = -zero * scale`` in float32
(exact: the product of an fp16 scale and a small integer fits float32), so ``u * scale + min``
equals ``(u - zero) * scale`` exactly.
"""
from __future__ import annotations

import glob
import logging
import os

import torch
from torch import nn

from llm_compile.checkpoints.common import install_quant_linear
from llm_compile.checkpoints.hf_model import empty_causal_lm, load_float_tensors
from llm_compile.quantize import pack_uint4

log = logging.getLogger(__name__)

__all__ = ["load_gptq", "unpack_gptq_int32"]


def unpack_gptq_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding ``32 / bits`` unsigned values (low bits first) -> int32 values, unpacked
    along ``dim`` (0: rows, GPTQ's qweight; 1: columns, its qzeros)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    vals = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)          # [..., per]
    if dim == 0:
        return vals.permute(0, 2, 1).reshape(packed.shape[0] * per, packed.shape[1])
    return vals.reshape(packed.shape[0], packed.shape[1] * per)


def _check_config(qc: dict, path) -> tuple[int, int, bool]:
    bits, group = qc.get("bits"), qc.get("group_size", 128)
    if qc.get("desc_act", False):
        raise ValueError(f"{path}: GPTQ with desc_act=True (act-order: weights grouped by a "
                         "permutation g_idx) is not supported; re-quantize with desc_act=False or "
                         "load it with transformers and llm_compile.quantize_weights")
    if bits not in (4, 8):
        raise ValueError(f"{path}: GPTQ bits={bits!r}; only 4 and 8 are supported")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{path}: GPTQ checkpoint_format={fmt!r}; only 'gptq' and 'gptq_v2' are supported")
    return bits, group, fmt == "gptq"


def _read_safetensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors file (GPTQ .bin checkpoints are not supported)")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _linear_weights(prefix: str, t: dict, k: int, bits: int, group: int, zero_plus_one: bool, path):
    qweight, qzeros, scales = t.pop(prefix + ".qweight"), t.pop(prefix + ".qzeros"), t.pop(prefix + ".scales")
    g = k if group in (-1, None) else group
    g_idx = t.pop(prefix + ".g_idx", None)
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // g):
        raise ValueError(f"{path}: {prefix}.g_idx is not k // {g} (act-order weights); not supported")
    u = unpack_gptq_int32(qweight, bits, 0).t()                     # [N, K]
    zeros = unpack_gptq_int32(qzeros, bits, 1)[:, : u.shape[0]].t()  # [N, K/g]
    if zero_plus_one:
        zeros = zeros + 1
    s = scales.t().contiguous()
    if torch.all(zeros == 2 ** (bits - 1)):
        q = pack_uint4(u) if bits == 4 else (u - 128).to(torch.int8)
        return q.contiguous(), s, None, g
    s32 = s.to(torch.float32)
    mins = -(zeros.to(torch.float32) * s32)
    q = pack_uint4(u) if bits == 4 else u.to(torch.uint8)
    return q.contiguous(), s32, mins, g


def load_gptq(path: str | os.PathLike, quant_config: dict, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM from the GPTQ folder ``path``, each GPTQ linear a ``QuantLinear``
    with the checkpoint's integers (see the module docstring)."""
    from transformers import AutoConfig

    bits, group, zero_plus_one = _check_config(quant_config, path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = empty_causal_lm(config, dtype)
    tensors = _read_safetensors(path)
    prefixes = sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
    if not prefixes:
        raise ValueError(f"{path}: no '*.qweight' tensor: not a GPTQ checkpoint")
    for prefix in prefixes:
        lin = model.get_submodule(prefix)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{path}: {prefix} is a {type(lin).__name__} in {type(model).__name__}, not a linear")
        q, s, mins, g = _linear_weights(prefix, tensors, lin.in_features, bits, group, zero_plus_one, path)
        bias = tensors.pop(prefix + ".bias", None)
        ql = install_quant_linear(model, prefix, qweight=q, scales=s, mins=mins, bits=bits, group_size=g)
        if bias is not None:
            if ql.bias is None:
                raise ValueError(f"{path}: {prefix}.bias given but the model's linear has no bias")
            ql.bias.data.copy_(bias.to(ql.bias.dtype))
    qids = {id(model.get_submodule(p).qweight) for p in prefixes}
    qids |= {id(model.get_submodule(p).bias) for p in prefixes if model.get_submodule(p).bias is not None}
    load_float_tensors(model, tensors, what=f"GPTQ folder {path}", already=qids)
    model.llmaccel_quantized = prefixes
    model.llmaccel_source = {"format": "gptq", "bits": bits, "group_size": group}
    log.info("load_gptq: %d linears imported as integers", len(prefixes))
    return model
