"""Which model instance is running now, and per-instance state that outlives one graph.

Used by attention offload only (its worker-side KV is still keyed per model instance; the KV store
and SWA keep their state in the caller's cache object instead, see ``runtime/kv`` and
``runtime/swa``). The backend wraps every compiled graph so that, while
it runs, :func:`current_instance` names the model instance whose parameters were passed in (the
identity of its first ``nn.Parameter`` argument), and custom ops look their state up with it.

Custom ops that need configuration get an int ``handle`` baked into the graph by their pass
(:func:`register_handle`); the handle maps back to the Python object (a config, a worker pool).
"""
from __future__ import annotations

import itertools
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch

_local = threading.local()
_handles: dict[int, Any] = {}
_next_handle = itertools.count(1)
_lock = threading.Lock()


_watched: set[int] = set()
_gone_hooks: list = []


def on_instance_gone(hook) -> None:
    """Call ``hook(instance)`` when the parameter an instance key names is garbage-collected
    (the model is gone): runtime stores drop that instance's state then."""
    if hook not in _gone_hooks:
        _gone_hooks.append(hook)


def _instance_gone(key: int) -> None:
    _watched.discard(key)
    for hook in list(_gone_hooks):
        hook(key)


def instance_key_from_args(args, fallback: int) -> int:
    """Identity of the model instance a compiled graph is called for."""
    for a in args:
        if isinstance(a, torch.nn.Parameter):
            key = id(a)
            if key not in _watched:
                _watched.add(key)
                weakref.finalize(a, _instance_gone, key)
            return key
    return fallback


def current_instance() -> int:
    """The instance key of the graph running on this thread (0 outside a compiled graph)."""
    return getattr(_local, "instance", 0)


@contextmanager
def running(instance: int) -> Iterator[None]:
    prev = getattr(_local, "instance", 0)
    _local.instance = instance
    try:
        yield
    finally:
        _local.instance = prev


def register_handle(obj: Any) -> int:
    """Give ``obj`` an int handle that a pass can bake into a graph as an op argument."""
    with _lock:
        h = next(_next_handle)
        _handles[h] = obj
    return h


def lookup_handle(handle: int) -> Any:
    try:
        return _handles[handle]
    except KeyError:
        raise RuntimeError(f"llmaccel: unknown runtime handle {handle} (graph compiled in another process?)") from None
