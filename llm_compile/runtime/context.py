"""Runtime handles: per-compile objects (an offload worker pool, an SWA config for the workers)
that attention offload bakes into its graphs as int op arguments.

Per-sequence state is never looked up here: the KV store and SWA keep theirs on the caller's cache
object (``runtime/kv``, ``runtime/swa``), offload's worker-side KV is keyed by the sequence the
cache's phantoms own (``runtime/offload/sequences``). A pass registers an object
(:func:`register_handle`) and bakes the int into the graph; the op maps it back
(:func:`lookup_handle`).
"""
from __future__ import annotations

import itertools
import threading
from typing import Any

_handles: dict[int, Any] = {}
_next_handle = itertools.count(1)
_lock = threading.Lock()


def register_handle(obj: Any) -> int:
    """Give ``obj`` an int handle that a pass can bake into a graph as an op argument."""
    with _lock:
        h = next(_next_handle)
        while h in _handles:  # taken by register_handle_at
            h = next(_next_handle)
        _handles[h] = obj
    return h


def register_handle_at(handle: int, obj: Any) -> None:
    """Bind a given handle number to ``obj`` (the dump's ``repro.py`` recreates, in a fresh
    process, the objects a graph's baked handles named when it was compiled)."""
    with _lock:
        old = _handles.get(handle, obj)
        if old is not obj and old != obj:
            raise RuntimeError(f"llmaccel: runtime handle {handle} is already bound to another object")
        _handles[handle] = obj


def lookup_handle(handle: int) -> Any:
    try:
        return _handles[handle]
    except KeyError:
        raise RuntimeError(f"llmaccel: unknown runtime handle {handle} (graph compiled in another process?)") from None
