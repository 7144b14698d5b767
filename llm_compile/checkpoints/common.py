"""Shared helpers of the checkpoint importers: put integer weights into a model as ``QuantLinear``."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from llm_compile.quantize import QuantLinear

__all__ = ["install_quant_linear", "DEFAULT_SKIP"]

DEFAULT_SKIP = ("lm_head",)
"""Linears kept in float by the importers (as ``quantize_weights`` does): the output head."""


def install_quant_linear(model: nn.Module, name: str, *, qweight: Tensor, scales: Tensor,
                         mins: Tensor | None, bits: int, group_size: int) -> QuantLinear:
    """Replace the ``nn.Linear`` ``name`` of ``model`` by a :class:`QuantLinear` holding exactly
    ``qweight``/``scales``/``mins`` (storage format of :mod:`llm_compile.quantize`); the bias, if
    any, is copied from the linear. Raises ``ValueError`` when the shapes do not fit the linear."""
    lin = model.get_submodule(name)
    if not isinstance(lin, nn.Linear):
        raise ValueError(f"{name} is a {type(lin).__name__}, not an nn.Linear")
    n, k = lin.out_features, lin.in_features
    ql = QuantLinear(k, n, lin.bias is not None, bits, group_size, scales.dtype, device=lin.weight.device,
                     dtype=lin.weight.dtype, symmetric=mins is None)
    for buf, val in (("qweight", qweight), ("scales", scales), ("mins", mins)):
        if val is None:
            continue
        have = getattr(ql, buf)
        if tuple(val.shape) != tuple(have.shape) or val.dtype != have.dtype:
            raise ValueError(f"{name}.{buf}: got {val.dtype}{tuple(val.shape)}, the linear [{n}, {k}] "
                             f"with INT{bits} group {group_size} needs {have.dtype}{tuple(have.shape)}")
        have.copy_(val)
    if lin.bias is not None:
        ql.bias.data.copy_(lin.bias.detach())
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, ql)
    return ql
