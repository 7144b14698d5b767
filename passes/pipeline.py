"""The ordered pass pipeline: the registry of every pass, in the order they run.

Attention passes come first (they only swap the implementation of ``llmaccel::attention``),
Anda lowering next, then the decode matmuls it left (CPU weight-major form), then the local KV store (moves the KV cache into the in-place store; exclusive
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
        # Passes run inside AOTAutograd's fake-tensor mode, and a pass module (with the runtime
        # modules it imports: op implementations, stores) may be imported here for the first time:
        # import it with fake mode off, so that nothing made at import time is a fake tensor that
        # real run-time code later touches (issue 14: TieredKV's empty-position constant was).
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return importlib.import_module(f"llm_compile.passes.{self.module}").run


PIPELINE: list[PassSpec] = [
    PassSpec("canonicalize_attention", "canonicalize_attention", lambda c: c.canonicalize),
    PassSpec("sparse_window_attention", "sparse_window_attention", lambda c: c.swa is not None),
    PassSpec("anda_lowering", "anda_lowering", lambda c: c.anda is not None),
    PassSpec("decode_matmul", "decode_matmul", lambda c: c.decode_matmul),
    PassSpec("local_kv_store", "local_kv_store", lambda c: c.kv_store is not None),
    PassSpec("attention_offload", "attention_offload", lambda c: c.offload is not None),
]

PASS_NAMES = [p.name for p in PIPELINE]
