"""The ordered pass pipeline: the registry of every pass, in the order they run.

Attention passes come first (they only swap the implementation of ``llmaccel::attention``),
Anda lowering next, then the local KV store (moves the KV cache into the in-place store; exclusive
with offload), and attention offload last because it cuts the graph into partitions.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from llm_compile.config import LLMAccelConfig


@dataclass(frozen=True)
class PassSpec:
    name: str
    module: str
    """Module (under ``llm_compile.passes``) whose ``run(gm, config, ctx)`` is the pass."""
    enabled: Callable[[LLMAccelConfig], bool]

    def load(self):
        return importlib.import_module(f"llm_compile.passes.{self.module}").run


PIPELINE: list[PassSpec] = [
    PassSpec("canonicalize_attention", "canonicalize_attention", lambda c: c.canonicalize),
    PassSpec("sparse_window_attention", "sparse_window_attention", lambda c: c.swa is not None),
    PassSpec("anda_lowering", "anda_lowering", lambda c: c.anda is not None),
    PassSpec("local_kv_store", "local_kv_store", lambda c: c.kv_store is not None),
    PassSpec("attention_offload", "attention_offload", lambda c: c.offload is not None),
]

PASS_NAMES = [p.name for p in PIPELINE]
