"""The pool a compiled model talks to: one :class:`SharedPool` per offload configuration, shared by
the prefill and decode graphs, restarting its workers after a fault, handing out sequence ids.

::

    shared = get_pool(OffloadConfig(workers=2))   # starts the workers (compile time)
    seq = shared.new_sequence()                   # SequenceHandle: an id, released when collected
    shared.prefill(seq.seq_id, site, k, v)        # AttentionWorkerPool's API, by sequence id
    out = shared.decode(seq.seq_id, site, q, k_new, v_new, scale, cached_len=n)
    del seq                                       # the workers free that sequence's KV

Recovery after a fault. When a worker dies or stops answering, the underlying
:class:`~llm_compile.runtime.offload.pool.AttentionWorkerPool` stops all its workers and is
*broken*: the KV of every sequence is lost, so decode calls raise (the error says to start the
sequence again). The next **prefill** (a new prompt, e.g. calling ``generate`` again) starts a
fresh set of workers and goes on. Sequence ids keep counting across restarts, so a stale sequence
can never read another one's KV.

Releases. A :class:`SequenceHandle` that is garbage-collected only *queues* its id (a collection
can happen in the middle of a request, when the process group must not be used); the queue is
sent to the workers at the start of the pool's next call, or by :meth:`SharedPool.flush_releases`.

Who owns a sequence: see :mod:`~llm_compile.runtime.offload.sequences`.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from torch import Tensor

from llm_compile.runtime.offload.pool import AttentionWorkerPool, OffloadFuture
from llm_compile.runtime.offload.sequences import SequenceHandle, next_sequence_id

log = logging.getLogger(__name__)


class SharedPool:
    """A restartable :class:`AttentionWorkerPool` for one offload configuration."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.pool: AttentionWorkerPool | None = None
        self.generation = 0
        """Incremented at every (re)start; sequences of an older generation are gone."""
        self.last_failure: str | None = None
        self.restarts = 0
        self._pending: deque = deque()
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------
    def _start(self) -> AttentionWorkerPool:
        c = self.cfg
        if c.init_method:
            return AttentionWorkerPool.connect(c.init_method, c.workers + 1, c.timeout_s, backend=c.transport)
        if c.transport == "nccl":
            raise ValueError("llmaccel offload: a local pool (no init_method) uses gloo; "
                             "start NCCL workers with torchrun and set offload.init_method")
        return AttentionWorkerPool.spawn(c.workers, c.timeout_s)

    def current(self, restart: bool = False) -> AttentionWorkerPool:
        """The live pool. After a fault: with ``restart`` (a prefill) a fresh one, else an error
        that says how to recover."""
        with self._lock:
            p = self.pool
            if p is not None and not p._closed and p.broken is None:
                return p
            if p is not None:
                if p.broken is not None:
                    self.last_failure = p.broken
                p.shutdown(join_s=1.0)
                self.pool = None
            if self.last_failure is not None and not restart:
                raise RuntimeError(
                    f"llmaccel offload: the attention workers failed ({self.last_failure}) and were "
                    "stopped; the KV cache of the sequences they held is lost. Start the sequence "
                    "again from its prompt (a new prefill, e.g. call generate() again): it starts "
                    "fresh workers")
            if self.last_failure is not None:
                log.warning("llmaccel offload: restarting the attention workers after a fault (%s)",
                            self.last_failure)
                self.restarts += 1
            self.pool = self._start()
            self.generation += 1
            self.last_failure = None
            self._pending.clear()  # the old workers' KV is gone with them
            return self.pool

    def shutdown(self) -> None:
        with self._lock:
            if self.pool is not None:
                self.pool.shutdown()
            self.pool = None

    @property
    def broken(self) -> str | None:
        return self.pool.broken if self.pool is not None else self.last_failure

    @property
    def n_workers(self) -> int:
        return self.cfg.workers

    @property
    def backend(self) -> str:
        return self.current().backend

    # -- sequences ----------------------------------------------------------------------------
    def new_sequence(self) -> SequenceHandle:
        """A fresh sequence id on the live pool (restarting it after a fault)."""
        self.current(restart=True)
        return SequenceHandle(next_sequence_id(), self.generation, self._pending)

    def flush_releases(self) -> int:
        """Send the queued releases of collected :class:`SequenceHandle` objects; returns how many
        KV entries the workers freed."""
        freed = 0
        while self._pending:
            seq_id, gen = self._pending.popleft()
            p = self.pool
            if gen != self.generation or p is None or p.broken is not None or p._closed:
                continue  # those workers are gone, and the KV with them
            freed += p.release(seq_id)
        return freed

    # -- AttentionWorkerPool's API ------------------------------------------------------------
    def prefill(self, seq_id: int, site: int, k: Tensor, v: Tensor, **kw: Any) -> Tensor | None:
        pool = self.current(restart=True)
        self.flush_releases()
        return pool.prefill(seq_id, site, k, v, **kw)

    def decode_async(self, seq_id: int, site: int, *args, **kw) -> OffloadFuture:
        pool = self.current()
        self.flush_releases()
        return pool.decode_async(seq_id, site, *args, **kw)

    def decode(self, seq_id: int, site: int, *args, **kw) -> Tensor:
        return self.decode_async(seq_id, site, *args, **kw).wait()

    def release(self, seq_id: int, site: int = -1) -> int:
        p = self.pool
        if p is None or p.broken is not None or p._closed:
            return 0
        return p.release(seq_id, site)

    def sync(self) -> None:
        self.current().sync()

    def kv_bytes(self, allocated: bool = False) -> list[int]:
        self.flush_releases()
        return self.current().kv_bytes(allocated)

    def local_bytes(self) -> int:
        return self.current().local_bytes()

    def set_mode(self, mode, seq_id: int = -1, site: int = -1) -> None:
        self.current().set_mode(mode, seq_id, site)

    def ping(self) -> list[int]:
        return self.current().ping()

    def worker_pids(self) -> list[int]:
        return self.pool.worker_pids() if self.pool is not None else []


_POOLS: dict[Any, SharedPool] = {}
"""One shared pool per offload configuration (prefill and decode graphs of a model, and models
compiled with the same options, talk to the same workers; sequences keep their KV apart)."""


def get_pool(cfg) -> SharedPool:
    """The :class:`SharedPool` of an :class:`~llm_compile.config.OffloadConfig`, its workers
    started (a start-up failure raises here, at compile time)."""
    key = (cfg.workers, cfg.init_method, cfg.transport, cfg.timeout_s)
    shared = _POOLS.get(key)
    if shared is None:
        shared = _POOLS[key] = SharedPool(cfg)
    shared.current(restart=True)
    return shared


def shutdown_pools() -> None:
    """Shut down every pool made by :func:`get_pool`."""
    for shared in list(_POOLS.values()):
        shared.shutdown()
    _POOLS.clear()
