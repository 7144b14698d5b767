"""Overlapped host gathers: a step's host rows are gathered (and, for CUDA models, copied to the
device on a side stream from pinned memory) on one worker thread while the calling thread gathers
the device rows. ``torch.index_select`` releases the GIL, so on CPU the two gathers (one from RAM
or the mmap file, one from the device tier) run at the same time on two cores.

The executor is process infrastructure shared by every cache (one thread; no per-sequence state).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

_POOL: ThreadPoolExecutor | None = None
_STREAMS: dict = {}


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(1, thread_name_prefix="llmaccel-kv-fetch")
    return _POOL


def _gather(src: Tensor, idx: Tensor, device: torch.device):
    rows = src.index_select(0, idx)
    if device.type != "cuda":
        return rows, None
    stream = _STREAMS.setdefault(device, torch.cuda.Stream(device))
    rows = rows.pin_memory()
    with torch.cuda.stream(stream):
        out = rows.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return out, done


MIN_OVERLAP_BYTES = 1 << 18
"""Smaller host gathers run inline: handing them to the thread costs more than it hides."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worth_overlapping(nbytes: int, device: torch.device) -> bool:
    """A thread helps only with a second core to run on (or a CUDA copy to hide) and a big gather."""
    return nbytes >= MIN_OVERLAP_BYTES and (device.type == "cuda" or _cores() > 1)


def start(src: Tensor, idx: Tensor, device: torch.device, overlap: bool) -> Future | tuple:
    """Begin gathering ``src[idx]`` onto ``device``; :func:`finish` returns the rows. With
    ``overlap`` the gather runs on the worker thread when :func:`worth_overlapping`."""
    if not (overlap and worth_overlapping(idx.numel() * src.shape[-1] * src.element_size(), device)):
        return _gather(src, idx, device)
    return _pool().submit(_gather, src, idx, device)


def finish(pending) -> Tensor:
    out, done = pending.result() if isinstance(pending, Future) else pending
    if done is not None:
        torch.cuda.current_stream(out.device).wait_event(done)
        out.record_stream(torch.cuda.current_stream(out.device))
    return out
