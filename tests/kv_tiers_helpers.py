"""Helpers shared by the model-level tiered-KV tests (``tests/runtime/test_kv_tiers*.py``)."""
from __future__ import annotations

import torch

from model_zoo import build  # torch only at import, no llm_compile (the fresh-process test checks)


MHA_FAMILIES = {"gpt2": {}, "llama_mha": {"kv_heads": 4}, "opt": {}}
"""The multi-head-attention models of the phase-3 (recompute) tests: ``model_zoo`` family
(the name before ``_``) and its build options."""


def mha_model(name: str):
    """A small random-weight model of ``MHA_FAMILIES[name]``."""
    return build(name.split("_")[0], **MHA_FAMILIES[name])


def kv_budget(model, batch: int, tokens: int) -> int:
    """Bytes of float32 K+V for ``tokens`` tokens per layer of ``batch`` sequences of ``model``."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * batch * heads * 2 * d * 4 * tokens


def kept_budget(model, batch: int, tokens: int) -> int:
    """Bytes of float32 phase-3 kept rows (layer input, plus RoPE cos/sin for rotary models) for
    ``tokens`` tokens per layer of ``batch`` sequences of ``model``."""
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    keep = cfg.hidden_size + (2 * d if cfg.model_type in ("llama", "mistral", "qwen2") else 0)
    return cfg.num_hidden_layers * batch * keep * 4 * tokens


def site_kvs(cache):
    """The per-layer stores (``TieredKV``/``SiteKV``) a cache's phantoms carry."""
    return [layer.keys.llmaccel_kv for layer in cache.layers]


def decode_logits(model, options, ids, steps):
    """Compile ``model`` with ``options`` (``inner: eager``), prefill ``ids`` into a fresh
    ``DynamicCache`` and decode ``steps`` greedy tokens; returns the decode logits and the cache."""
    from transformers import DynamicCache

    model.forward = torch.compile(model.forward, backend="llmaccel", options={"inner": "eager", **options})
    cache, logits = DynamicCache(), []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True).logits
        for _ in range(steps):
            out = model(out[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
            logits.append(out)
    return torch.cat(logits, 1), cache
