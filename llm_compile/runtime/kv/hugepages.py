"""KV buffers on transparent huge pages (Linux, CPU).

A sparse decode step reads a few hundred scattered rows per head out of a cache of tens of MB;
with 4 KiB pages nearly every row is a TLB miss, and the page walks, not the bytes, set the time
(SWA's CPU attend at 8k tokens, batch 4, in scratch timings: about 2-3x slower than on 2 MiB
pages). So
:func:`empty_kv` maps large CPU buffers anonymously and asks the kernel for huge pages
(``madvise(MADV_HUGEPAGE)``, honoured when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always`` or ``madvise``) before anything touches them. PyTorch's own switch for the same thing,
``THP_MEM_ALLOC_ENABLE=1``, applies to every allocation of the process; this applies to the KV
buffers only. Elsewhere (GPU, small buffers, no ``MADV_HUGEPAGE``) it is ``torch.empty``.
"""
from __future__ import annotations

import math
import mmap

import torch
from torch import Tensor

MIN_BYTES = 2 << 20
"""Buffers below one huge page are left to the allocator."""


def empty_kv(shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """An uninitialised tensor like ``torch.empty(shape, dtype=dtype, device=device)``; on CPU and
    from 2 MiB up, backed by an anonymous mapping advised to use huge pages (freed with the tensor)."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # private: THP (shared is shmem)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:   # THP compiled out: plain pages, still correct
        pass
    return torch.frombuffer(mm, dtype=dtype, count=numel).view(shape)
