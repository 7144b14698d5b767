"""The mark on KV-cache tensors that a *dense* graph filled below ``swa.min_context``.

With ``swa.min_context`` set, the backend runs each captured graph in two compiled forms (see
:mod:`llm_compile.context_dispatch`): while the sequence is shorter than ``min_context``, a dense
graph (stock Inductor: no per-layer op, nothing to bookkeep), from then on the SWA graph. The cache
the dense graph fills holds plain K/V tensors without SWA state; the dispatcher marks them::

    dense graph  -> cache tensors k, v   (mark(k), mark(v))
    SWA graph    -> op sees a marked k: adopts the cache (KV copied into the in-place store once,
                    SWA scores started from this call's query, like a prompt) -> phantoms/state

A real cache tensor *without* the mark (filled by another model, or rebuilt outside the compiled
model, e.g. by a plain ``DynamicCache.reorder_cache``) is still refused by the ops with the
error that says what to do; :class:`~llm_compile.runtime.kv.cache.LLMAccelCache` keeps the mark
through its batch edits and crops.
"""
from __future__ import annotations

from torch import Tensor

ATTR = "llmaccel_dense_prefix"


def mark(t: Tensor) -> Tensor:
    """Mark ``t`` as a KV cache tensor filled by the dense graph below ``swa.min_context``."""
    setattr(t, ATTR, True)
    return t


def is_marked(t: Tensor | None) -> bool:
    return t is not None and getattr(t, ATTR, False)
