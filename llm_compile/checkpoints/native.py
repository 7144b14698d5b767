"""``save_quantized`` / ``load_native``: a quantized model as safetensors plus a JSON description.

Folder layout::

    llmaccel_model.safetensors   every parameter and persistent buffer (qweight, scales, mins, ...)
    llmaccel_quantized.json      {"format": "llmaccel-quantized", "version": 1,
                                  "linears": {name: {bits, group_size, symmetric, scale_dtype}},
                                  "skipped": [...], "source": {...}}
    config.json                  the base model's config, with a "quantization_config" whose
                                 quant_method is "llmaccel"

Plain ``from_pretrained`` on the folder refuses: the weights are not in ``model.safetensors``
(transformers raises that it finds no weight file), and once :mod:`llm_compile.checkpoints` is
imported the ``"llmaccel"`` quant method is registered with transformers and raises a message
naming :func:`llm_compile.load_quantized`.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from llm_compile.checkpoints.hf_model import empty_causal_lm
from llm_compile.quantize import QuantLinear

__all__ = ["save_quantized", "load_native", "is_native", "WEIGHTS", "DESCRIPTION", "QUANT_METHOD"]

WEIGHTS = "llmaccel_model.safetensors"
DESCRIPTION = "llmaccel_quantized.json"
QUANT_METHOD = "llmaccel"
FORMAT, VERSION = "llmaccel-quantized", 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_native(path) -> bool:
    return os.path.isfile(os.path.join(path, DESCRIPTION))


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> str:
    """Write ``model`` (a transformers model holding ``QuantLinear`` layers) to ``directory``;
    :func:`llm_compile.load_quantized` restores it bit for bit. Returns the folder."""
    from safetensors.torch import save_model

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("save_quantized needs a transformers model (with .config); got "
                        f"{type(model).__name__}")
    linears = {n: {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
                   "scale_dtype": str(m.scales.dtype).removeprefix("torch.")}
               for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not linears:
        raise ValueError("save_quantized: the model has no QuantLinear (quantize_weights or "
                         "load_quantized first); save a float model with save_pretrained")
    os.makedirs(directory, exist_ok=True)
    save_model(model, os.path.join(directory, WEIGHTS))
    kinds = {(v["bits"], v["group_size"], v["symmetric"]) for v in linears.values()}
    desc = {"format": FORMAT, "version": VERSION, "model_class": type(model).__name__,
            "linears": linears, "skipped": list(getattr(model, "llmaccel_skipped", [])),
            "source": getattr(model, "llmaccel_source", None)}
    with open(os.path.join(directory, DESCRIPTION), "w") as f:
        json.dump(desc, f, indent=1)
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD, "load_with": "llm_compile.load_quantized(<this folder>)",
        "bits": sorted({k[0] for k in kinds}), "group_size": sorted({k[1] for k in kinds}),
        "symmetric": sorted({k[2] for k in kinds})}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return os.fspath(directory)


def load_native(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Inverse of :func:`save_quantized`."""
    from safetensors.torch import load_model
    from transformers import AutoConfig

    with open(os.path.join(directory, DESCRIPTION)) as f:
        desc = json.load(f)
    if desc.get("format") != FORMAT or desc.get("version") != VERSION:
        raise ValueError(f"{directory}: {DESCRIPTION} is format {desc.get('format')!r} version "
                         f"{desc.get('version')!r}; this llm_compile reads {FORMAT!r} version {VERSION}")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = empty_causal_lm(config, dtype or getattr(config, "dtype", None) or torch.float32)
    if type(model).__name__ != desc["model_class"]:
        raise ValueError(f"{directory} holds a {desc['model_class']}; its config builds {type(model).__name__}")
    for name, q in desc["linears"].items():
        lin = model.get_submodule(name)
        ql = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, q["bits"], q["group_size"],
                         _DTYPES[q["scale_dtype"]], dtype=lin.weight.dtype, symmetric=q["symmetric"])
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, ql)
    missing, unexpected = load_model(model, os.path.join(directory, WEIGHTS), strict=False)
    missing = [n for n in missing if not _non_persistent(model, n)]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match the description (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.tie_weights()
    model.llmaccel_quantized = list(desc["linears"])
    model.llmaccel_skipped = list(desc.get("skipped", []))
    model.llmaccel_source = desc.get("source")
    return model


def _non_persistent(model: nn.Module, name: str) -> bool:
    mod, _, leaf = name.rpartition(".")
    return leaf in getattr(model.get_submodule(mod) if mod else model, "_non_persistent_buffers_set", ())
