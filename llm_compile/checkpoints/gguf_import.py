"""Lossless GGUF import: Q4_0, Q4_1 and Q8_0 linears become ``QuantLinear`` with the file's integers.

Block layouts (32 weights along K per block; ``d``, ``m`` are fp16) and what they become::

    Q4_0  d, 16 bytes   nibble j = element j, nibble j+16 = element j+16 (low, high halves)
          W = d * (q - 8)         -> symmetric INT4, group 32, stored nibble = q (offset 8 already)
    Q4_1  d, m, 16 bytes          W = d * q + m   -> asymmetric INT4, group 32, mins = m
    Q8_0  d, 32 int8              W = d * q       -> symmetric INT8, group 32

The nibbles are re-packed to :mod:`llm_compile.quantize`'s order (low nibble = even k); scales and
minima stay fp16, so ``dequantize_weight`` computes ``d * q (+ m)`` in float32 exactly as gguf-py
(and therefore transformers' GGUF loader) does. Every other tensor (norms, embeddings, the output
head, other quantization types) is dequantized by gguf-py, as transformers does.

The model is built from the file's config by transformers (``AutoConfig`` with ``gguf_file=``),
and GGUF names are mapped to HF names by transformers' own map and tensor processor, so per-arch
row permutations (Llama's q/k ``reverse_permute``) apply to the integers, scales and minima too:
the processor is run on row indices and must act as a row permutation, otherwise the import stops.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from llm_compile.checkpoints.common import DEFAULT_SKIP, install_quant_linear
from llm_compile.checkpoints.hf_model import empty_causal_lm, load_float_tensors
from llm_compile.quantize import pack_uint4

log = logging.getLogger(__name__)

__all__ = ["load_gguf", "gguf_blocks_to_quant", "LOSSLESS_TYPES"]

LOSSLESS_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def gguf_blocks_to_quant(data: np.ndarray, type_name: str):
    """Raw GGUF rows ``uint8 [N, G * type_size]`` -> ``(qweight, scales, mins, bits)`` (group 32)."""
    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).reshape(data.shape[0], -1)
    n = raw.shape[0]
    if type_name == "Q8_0":
        blocks = raw.reshape(n, -1, 34)
        d = blocks[..., :2].contiguous().view(torch.float16).reshape(n, -1)
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, -1)
        return q, d, None, 8
    if type_name not in ("Q4_0", "Q4_1"):
        raise ValueError(f"GGUF type {type_name} has no lossless QuantLinear form ({LOSSLESS_TYPES})")
    head = 2 if type_name == "Q4_0" else 4
    blocks = raw.reshape(n, -1, head + 16)
    d = blocks[..., :2].contiguous().view(torch.float16).reshape(n, -1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, -1) if type_name == "Q4_1" else None
    qs = blocks[..., head:]
    u = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, -1)     # elements 0..15, then 16..31
    return pack_uint4(u), d, m, 4


def _row_permutation(processor, name: str, n: int, kwargs) -> torch.Tensor | None:
    """Rows the transformers processor moves for tensor ``name``: ``perm`` with
    ``processed[i] = original[perm[i]]``; ``None`` if it keeps the order. Raises if the processor
    does anything but permute whole rows (then the integers cannot follow it)."""
    width = 3
    probe = np.arange(n * width, dtype=np.float64).reshape(n, width)
    res = processor.process(weights=probe.copy(), name=name, **kwargs)
    out = np.asarray(res.weights)
    if res.name != name or out.shape != probe.shape:
        raise NotImplementedError(f"GGUF tensor {name}: transformers' processor renames or reshapes it; "
                                  "its integers cannot be imported losslessly")
    perm = (out[:, 0] // width).astype(np.int64)
    if not np.array_equal(out, probe[perm]) or not np.array_equal(np.sort(perm), np.arange(n)):
        raise NotImplementedError(f"GGUF tensor {name}: transformers' processor does not permute whole "
                                  "rows; its integers cannot be imported losslessly")
    return None if np.array_equal(perm, np.arange(n)) else torch.from_numpy(perm)


def _shape_of(model, name: str):
    mod, _, leaf = name.rpartition(".")
    t = getattr(model.get_submodule(mod) if mod else model, leaf, None)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"GGUF tensor maps to {name}, which {type(model).__name__} lacks")
    return t.shape


class _TopLevel:
    """``model`` seen without children: transformers' map then skips its per-submodule recursion
    (one tensor-name table per submodule, 40 s for a 30-layer model on a slow CPU)."""

    def __init__(self, model):
        self.config, self.state_dict = model.config, model.state_dict

    def named_children(self):
        return []


def _names(model, processor, reader, weights_map) -> dict[str, str]:
    """GGUF tensor name -> HF name, by transformers' map (the full recursive one only when the
    top-level map misses a tensor of the file)."""
    names = weights_map(_TopLevel(model), processor)
    if all(t.name in names for t in reader.tensors):
        return names
    return weights_map(model, processor)


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              skip: tuple[str, ...] = DEFAULT_SKIP) -> nn.Module:
    """A transformers causal LM from the GGUF file ``path`` with Q4_0/Q4_1/Q8_0 linears as
    ``QuantLinear`` (file integers, fp16 scales/minima); everything else dequantized to ``dtype``.

    Sets ``model.llmaccel_quantized`` (linears imported as integers) and
    ``model.llmaccel_float_linears`` (linears left in float, with the reason)."""
    import gguf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)

    path = os.fspath(path)
    folder, fname = os.path.split(os.path.abspath(path))
    parsed = load_gguf_checkpoint(path, return_tensors=False)
    # what AutoConfig.from_pretrained(folder, gguf_file=fname) builds, without parsing the file twice
    config = CONFIG_MAPPING[parsed["config"]["model_type"]].from_dict(dict(parsed["config"]))
    model = empty_causal_lm(config, dtype)      # every parameter is filled below (checked)
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    name_map = _names(model, processor, reader, get_gguf_hf_weights_map)
    kwargs = {"tensor_key_mapping": name_map, "parsed_parameters": parsed}

    quantized, float_linears, floats = [], {}, []
    for t in reader.tensors:
        hf = name_map.get(t.name)
        if hf is None:
            log.info("GGUF tensor %s has no place in %s; ignored", t.name, type(model).__name__)
            continue
        mod_name = hf.rsplit(".", 1)[0]
        mod = model.get_submodule(mod_name) if hf.endswith(".weight") else None
        tname = t.tensor_type.name
        if not isinstance(mod, nn.Linear) or any(s in mod_name.split(".") for s in skip) \
                or tname not in LOSSLESS_TYPES:
            if isinstance(mod, nn.Linear):
                float_linears[mod_name] = "skipped by name" if tname in LOSSLESS_TYPES else f"type {tname}"
            floats.append((t, hf))
            continue
        qweight, scales, mins, bits = gguf_blocks_to_quant(t.data, tname)
        perm = _row_permutation(processor, t.name, qweight.shape[0], kwargs)
        if perm is not None:
            qweight, scales = qweight[perm], scales[perm]
            mins = None if mins is None else mins[perm]
        install_quant_linear(model, mod_name, qweight=qweight, scales=scales, mins=mins, bits=bits,
                             group_size=32)
        quantized.append(mod_name)
    # after the swaps, so that biases land in the QuantLinear that replaced their linear
    tensors = {}
    for t, hf in floats:
        res = processor.process(weights=gguf.dequantize(t.data, t.tensor_type), name=t.name, **kwargs)
        shape = _shape_of(model, hf)
        tensors[hf] = torch.from_numpy(np.array(res.weights, copy=True)).reshape(shape)
    qids = {id(model.get_submodule(n).qweight) for n in quantized}
    load_float_tensors(model, tensors, what=f"GGUF file {fname}", already=qids)
    model.llmaccel_quantized = quantized
    model.llmaccel_float_linears = float_linears
    model.llmaccel_source = {"format": "gguf", "file": fname}
    log.info("load_gguf: %d linears imported as integers, %d left in float", len(quantized),
             len(float_linears))
    return model
