"""Process lifecycle of a local attention-worker pool: start-up watching, fault watching, reaping.

Kept apart from :mod:`~llm_compile.runtime.offload.pool` so that what the finalizer and the
watcher thread hold (:class:`Resources`) has no reference to the pool object (``weakref.finalize``
targets must not).

Faults. A watcher thread waits on the worker processes; the first one that exits while the pool is
not shutting down marks the pool *broken* and stops every other worker at once (no process is left
waiting for a compute process that will never talk to it again). A worker that stops answering is
handled the same way by the pool when its request times out (:meth:`Resources.fail`).
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import shutil
import threading
import time
from multiprocessing.connection import wait as wait_sentinels
from typing import Any

from llm_compile.runtime.offload import protocol as P

log = logging.getLogger(__name__)

STARTUP_FACTOR = 5.0
"""Worker start-up (process start, imports, rendezvous) may take this many times ``timeout_s``."""
MIN_STARTUP_S = 60.0


def startup_timeout(timeout_s: float) -> float:
    """How long a pool waits for its workers to start: ``max(60, 5 × timeout_s)`` seconds (a
    spawned worker imports torch first, which takes many seconds on a busy machine)."""
    return max(MIN_STARTUP_S, STARTUP_FACTOR * float(timeout_s))


class Resources:
    """What must be released even if the pool object is lost (finalizer target, no pool ref):
    the process group, the worker processes, the rendezvous folder, and the broken state."""

    def __init__(self, pg, store, procs: list, store_dir: str | None = None) -> None:
        self.pg, self.store, self.procs, self.store_dir = pg, store, procs, store_dir
        self.broken: str | None = None
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def drop_store(self) -> None:
        """Remove the rendezvous folder (the group is up; nobody needs it any more)."""
        if self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None

    def fail(self, msg: str) -> None:
        """Mark the pool broken (first reason wins) and stop every worker now."""
        with self._lock:
            if self.broken is None:
                self.broken = msg
                log.error("llmaccel offload: %s; stopping all attention workers", msg)
        self.kill_all()

    def kill_all(self, grace_s: float = 0.5) -> None:
        """SIGTERM every live worker, SIGKILL what is left after ``grace_s`` (a stopped process
        only dies of SIGKILL), and reap them."""
        self.closing.set()
        live = [p for p in self.procs if p.is_alive()]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + grace_s
        for p in live:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in live:
            if p.is_alive():
                p.kill()
                p.join(2.0)

    def close(self, join_s: float = 5.0) -> None:
        """Wait up to ``join_s`` for the workers to exit by themselves (they were told to), then
        stop the rest; drop the group and the rendezvous folder."""
        self.closing.set()
        deadline = time.monotonic() + join_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        late = [p.pid for p in self.procs if p.is_alive()]
        if late and self.broken is None:
            log.warning("attention workers %s did not exit within %.1fs; terminating them", late, join_s)
        if late:
            self.kill_all()
        self.procs = []
        self.pg = self.store = None
        self.drop_store()

    def watch(self) -> None:
        """Start the fault watcher (local pools): the first worker that exits unasked breaks the pool
        and stops the others."""
        if self._watcher is not None or not self.procs:
            return
        procs = list(self.procs)

        def loop():
            while not self.closing.is_set():
                dead = wait_sentinels([p.sentinel for p in procs], timeout=0.25)
                if dead and not self.closing.is_set():
                    p = next(p for p in procs if p.sentinel in dead)
                    p.join(0.1)
                    rank = procs.index(p) + 1
                    self.fail(f"attention worker rank {rank} died (pid {p.pid}, exit code {p.exitcode})")
                    return

        self._watcher = threading.Thread(target=loop, daemon=True, name="llmaccel-offload-watch")
        self._watcher.start()


def _startup_report(store, procs: list) -> str:
    """Which ranks never started (their process did not reach the rendezvous) and which did."""
    started, missing = [], []
    for r, p in enumerate(procs, 1):
        try:
            ok = store.check([P.started_key(r)])
        except Exception:
            ok = False
        (started if ok else missing).append(f"{r} (pid {p.pid})")
    parts = []
    if missing:
        parts.append(f"worker rank(s) {', '.join(missing)} had not started (still importing torch / "
                     "llm_compile, or blocked)")
    if started:
        parts.append(f"rank(s) {', '.join(started)} had started but the process group did not form")
    return "; ".join(parts)


def connect_watching(make, procs: list, timeout_s: float, store=None, what: str = "") -> Any:
    """Run the blocking group creation in a thread while watching the worker processes, so a
    worker that dies during start-up is reported at once instead of after the timeout."""
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
            report = _startup_report(store, procs) if store is not None and not dead else ""
            Resources(None, None, procs).kill_all()
            if dead:
                r, p = dead[0]
                why = (f"worker rank {r} (pid {p.pid}) exited with code {p.exitcode} during start-up. "
                       "Local workers are started with the 'spawn' method, which re-imports your main "
                       "script: put the code that compiles and runs the model under "
                       "`if __name__ == \"__main__\":`")
            else:
                why = (f"attention worker start-up timed out after {timeout_s:.0f}s {what}: {report}. "
                       "On a busy machine raise offload.timeout_s (start-up may take "
                       f"{STARTUP_FACTOR:g}x it)")
            raise RuntimeError(f"llmaccel offload: starting attention workers failed: {why}")
    if "err" in box:
        Resources(None, None, procs).kill_all()
        raise RuntimeError(f"llmaccel offload: starting attention workers failed: {box['err']}") from box["err"]
    return box["pg"]


def finalize_pool(res: Resources, pg, n_workers: int, join_s: float = 2.0, device: str = "cpu") -> None:
    """Shutdown, garbage collection, interpreter exit: send the workers that are still running a
    shutdown header (after a graceful shutdown: the "fin" that lets them exit; no answer awaited),
    then reap the processes (stopped after ``join_s``)."""
    res.closing.set()
    works = []
    if pg is not None and res.broken is None:
        hdr = P.Header(P.OP_SHUTDOWN, flags=P.FLAG_NOW).to_tensor(device)
        procs = res.procs or [None] * n_workers
        for r, p in enumerate(procs, 1):
            if res.procs and not p.is_alive():
                continue
            try:
                works.append(pg.send([hdr], r, P.TAG_REQUEST))
            except Exception:  # that worker's connection is gone
                pass
        for w in works:  # the headers are tiny: make sure they left before the group goes away
            try:
                w.wait(datetime.timedelta(seconds=1))
            except Exception:
                pass
    res.close(join_s)
    del works


_exit_finalizers: list = []


def close_at_exit(finalizer) -> None:
    """Run ``finalizer`` (a pool's ``weakref.finalize``) from this module's exit hook. The hook is
    registered when this module is imported, after ``multiprocessing``'s own, so it runs first
    (exit hooks run last-in first-out): the workers get their shutdown message and exit by
    themselves instead of being terminated as daemon processes."""
    _exit_finalizers[:] = [f for f in _exit_finalizers if f.alive] + [finalizer]


@atexit.register
def _close_pools_at_exit() -> None:
    for fin in list(_exit_finalizers):
        fin()


def private_dir() -> str:
    """A fresh folder readable by this user only (the local rendezvous store lives there)."""
    import tempfile

    d = tempfile.mkdtemp(prefix="llmaccel-offload-")
    os.chmod(d, 0o700)
    return d
