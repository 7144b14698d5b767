"""Quantized checkpoints in and out: ``load_quantized`` (GGUF file, GPTQ folder, or a folder written
by ``save_quantized``) and ``save_quantized``. Every importer keeps the checkpoint's own integers
(:class:`llm_compile.quantize.QuantLinear`), so the model computes what the checkpoint encodes."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from llm_compile.checkpoints import hf_refusal  # noqa: F401  (from_pretrained refuses our folders)
from llm_compile.checkpoints.native import is_native, load_native, save_quantized

__all__ = ["load_quantized", "save_quantized"]


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _gptq_config(path: str) -> dict | None:
    qc = os.path.join(path, "quantize_config.json")
    if os.path.isfile(qc):
        with open(qc) as f:
            return json.load(f)
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            q = json.load(f).get("quantization_config") or {}
        if str(q.get("quant_method", "")).lower() == "gptq":
            return q
    return None


def load_quantized(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM whose linears are :class:`~llm_compile.quantize.QuantLinear` holding
    the checkpoint's integers, in eval mode, ready for ``torch.compile(model.forward,
    backend="llmaccel", options={"anda": ...})``.

    ``path``: a GGUF file (Q4_0/Q4_1/Q8_0 linears imported losslessly, other tensors dequantized),
    a GPTQ folder (``quantize_config.json`` or a ``gptq`` ``quantization_config`` in ``config.json``,
    plus safetensors) or a folder written by :func:`save_quantized`. ``dtype``: float parameters
    (norms, embeddings, biases, the output head).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if _is_gguf(path):
            from llm_compile.checkpoints.gguf_import import load_gguf

            return load_gguf(path, dtype=dtype)
        raise ValueError(f"load_quantized: {path} is a file but not a GGUF file (no 'GGUF' magic)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_quantized: {path} does not exist")
    if is_native(path):
        return load_native(path, dtype)
    gptq = _gptq_config(path)
    if gptq is not None:
        from llm_compile.checkpoints.gptq_import import load_gptq

        return load_gptq(path, gptq, dtype=dtype)
    raise ValueError(f"load_quantized: {path} is neither a save_quantized folder (no llmaccel_quantized.json) "
                     "nor a GPTQ folder (no quantize_config.json, no gptq quantization_config in "
                     "config.json); for a GGUF model pass the .gguf file itself")
