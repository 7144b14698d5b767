"""Process lifecycle of a local attention-worker pool: startup watching, reaping, finalizers.

Kept apart from :mod:`~llm_compile.runtime.offload_pool` so the finalizer path holds no reference
to the pool object (``weakref.finalize`` targets must not).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from llm_compile.runtime import offload_protocol as P

log = logging.getLogger(__name__)


class Resources:
    """What must be released even if the pool object is lost (finalizer target, no pool ref)."""

    def __init__(self, pg, store, procs: list) -> None:
        self.pg, self.store, self.procs = pg, store, procs

    def close(self, join_s: float = 5.0) -> None:
        for p in self.procs:
            p.join(join_s)
            if p.is_alive():
                log.warning("attention worker pid %d did not exit; terminating", p.pid)
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        self.procs = []
        self.pg = self.store = None


def connect_watching(make, procs: list, timeout_s: float):
    """Run the blocking group creation in a thread while watching the worker processes, so a
    worker that dies during startup is reported at once instead of after the rendezvous timeout."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["pg"] = make()
        except BaseException as e:  # reported below
            box["err"] = e

    t = threading.Thread(target=target, daemon=True, name="llmaccel-offload-connect")
    t.start()
    deadline = time.monotonic() + timeout_s
    while t.is_alive():
        t.join(0.05)
        dead = [(r, p) for r, p in enumerate(procs, 1) if p.exitcode is not None]
        if dead or time.monotonic() > deadline:
            Resources(None, None, procs).close(0.5)
            why = (f"worker rank {dead[0][0]} exited with code {dead[0][1].exitcode}" if dead
                   else f"no rendezvous within {timeout_s:.0f}s")
            raise RuntimeError(f"llmaccel offload: starting attention workers failed: {why}")
    if "err" in box:
        Resources(None, None, procs).close(0.5)
        raise RuntimeError(f"llmaccel offload: starting attention workers failed: {box['err']}") from box["err"]
    return box["pg"]


def finalize_pool(res: Resources, pg, n_workers: int, join_s: float = 2.0, device: str = "cpu") -> None:
    """Shutdown, garbage collection, interpreter exit: send the workers that are still running a
    shutdown header (after a graceful shutdown: the "fin" that lets them exit; no answer awaited),
    then reap the processes (terminate/kill after ``join_s``)."""
    works = []
    hdr = P.Header(P.OP_SHUTDOWN, flags=P.FLAG_NOW).to_tensor(device)
    procs = res.procs or [None] * n_workers
    for r, p in enumerate(procs, 1):
        if res.procs and not p.is_alive():
            continue
        try:
            works.append(pg.send([hdr], r, P.TAG_REQUEST))
        except Exception:  # that worker's connection is gone
            pass
    res.close(join_s)
    del works


_POOLS: dict[Any, Any] = {}


def get_pool(cfg):
    """The shared pool for an :class:`~llm_compile.config.OffloadConfig` (created on first use), so
    that the prefill and decode graphs of a model talk to the same workers."""
    from llm_compile.runtime.offload_pool import AttentionWorkerPool

    key = (cfg.workers, cfg.init_method, cfg.transport, cfg.timeout_s)
    pool = _POOLS.get(key)
    if pool is None or pool._closed or pool.broken:
        if cfg.init_method:
            pool = AttentionWorkerPool.connect(cfg.init_method, cfg.workers + 1, cfg.timeout_s,
                                               backend=cfg.transport)
        else:
            if cfg.transport == "nccl":
                raise ValueError("llmaccel offload: a local pool (no init_method) uses gloo; "
                                 "start NCCL workers with torchrun and set offload.init_method")
            pool = AttentionWorkerPool.spawn(cfg.workers, cfg.timeout_s)
        _POOLS[key] = pool
    return pool


def shutdown_pools() -> None:
    """Shut down every pool made by :func:`get_pool`."""
    for pool in list(_POOLS.values()):
        pool.shutdown()
    _POOLS.clear()
