"""Sequences on the attention workers, owned by the model's cache.

A :class:`SequenceHandle` names one sequence's KV on the workers (``seq_id``, int64) and releases it
when garbage-collected. The model's cache owns it: the phantom KV tensors that an offloaded graph
returns (``llmaccel::kv_phantom``) are built by :func:`sequence_phantom` on a 16-byte storage
(magic, sequence id) that is a :class:`PhantomOwner`, a ``bytearray`` holding the handle. The next
step's graph reads the id back from the cache it is given (:func:`sequence_of`), so two caches of
one model never share KV; when the cache (every phantom of that sequence) is collected, the handle
is too, and the workers free the KV (queued, sent at the pool's next call). On devices other than
the CPU the 16 bytes live in device memory and cannot hold a Python object: the handle then lives
until it is released explicitly or its pool shuts down.
"""
from __future__ import annotations

import itertools
import struct
import weakref
from collections import deque

import torch
from torch import Tensor

SEQ_MAGIC = 0x4C4C4D4153455131  # "LLMASEQ1"
OWNER_BYTES = 16
_ids = itertools.count(1)
"""Sequence ids, unique in the process (across pools and restarts)."""
_live: "weakref.WeakValueDictionary[int, SequenceHandle]" = weakref.WeakValueDictionary()
"""Live handles by sequence id (weak: a handle lives exactly as long as its owners)."""
_pinned: dict[int, "SequenceHandle"] = {}
"""Handles of sequences whose phantoms live in device memory (cannot hold them): until release."""


def next_sequence_id() -> int:
    return next(_ids)


def _queue_release(pending: deque, seq_id: int, generation: int) -> None:
    pending.append((seq_id, generation))


class SequenceHandle:
    """One sequence's KV on the workers: ``seq_id`` (int64) plus a finalizer that queues its
    release when this object is garbage-collected. Whoever owns the sequence (its cache) keeps
    the handle."""

    def __init__(self, seq_id: int, generation: int, pending: deque) -> None:
        self.seq_id, self.generation = int(seq_id), generation
        self._finalizer = weakref.finalize(self, _queue_release, pending, self.seq_id, generation)
        self._finalizer.atexit = False
        _live[self.seq_id] = self

    def release(self) -> None:
        """Release now (idempotent)."""
        _pinned.pop(self.seq_id, None)
        self._finalizer()

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def __repr__(self) -> str:
        return f"SequenceHandle(seq_id={self.seq_id})"


class PhantomOwner(bytearray):
    """The 16 bytes (magic, sequence id) under a phantom KV tensor; keeps its handle alive."""

    def __init__(self, handle: SequenceHandle) -> None:
        super().__init__(struct.pack("<qq", SEQ_MAGIC, handle.seq_id))
        self.handle = handle


def sequence_phantom(handle: SequenceHandle, like: Tensor, shape: list | None = None) -> Tensor:
    """A tensor on ``like``'s device whose storage names ``handle``'s sequence and, on the CPU,
    keeps the handle alive: ``int64[2]`` without ``shape``, else a zero-stride tensor of ``like``'s
    dtype and that shape (a phantom KV cache)."""
    dtype = like.dtype if shape is not None else torch.int64
    if like.device.type == "cpu":
        t = torch.frombuffer(PhantomOwner(handle), dtype=dtype)
    else:
        _pinned[handle.seq_id] = handle
        t = torch.tensor([SEQ_MAGIC, handle.seq_id], dtype=torch.int64).to(like.device).view(dtype)
    if shape is None:
        return t
    return t.as_strided(list(shape), [0] * len(shape))


def sequence_of(t: Tensor | None) -> int | None:
    """The sequence id a :func:`sequence_phantom` tensor names (``None`` for any other tensor)."""
    if t is None:
        return None
    st = t.untyped_storage()
    if st.nbytes() != OWNER_BYTES:
        return None
    raw = st.cpu() if st.device.type != "cpu" else st
    magic, seq_id = struct.unpack("<qq", bytes(raw.tolist()))
    return seq_id if magic == SEQ_MAGIC else None


def live_handle(seq_id: int) -> SequenceHandle:
    """The handle of a sequence some tensor still names (that tensor keeps the handle alive)."""
    h = _live.get(seq_id)
    if h is None:
        raise RuntimeError(f"llmaccel offload: sequence {seq_id} was released (its cache was collected "
                           "or cleared); start the sequence again (prefill)")
    return h
