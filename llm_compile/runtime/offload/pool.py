"""The compute side (rank 0) of attention offload: :class:`AttentionWorkerPool`.

The pool splits every site's KV heads across its workers (:func:`~llm_compile.runtime.
offload.protocol.split_heads`: contiguous ranges, the first ``Hkv % N`` workers one head more) and
sends each worker its query heads and KV heads; it keeps no KV itself::

    pool = AttentionWorkerPool.spawn(2, timeout_s=30)        # local CPU workers, gloo on 127.0.0.1
    pool.prefill(seq, site, k, v)                            # prompt K/V [B, Hkv, L, D] -> workers
    out = pool.decode(seq, site, q, k_new, v_new, scale)     # [B, Hq, 1, D]; k_new/v_new appended
    fut = pool.decode_async(...); ...; out = fut.wait()      # overlap with other work
    pool.release(seq)                                        # free that sequence's KV everywhere
    pool.kv_bytes()                                          # KV bytes held, per worker
    pool.shutdown()

``seq`` is a sequence id (int64; see :class:`~llm_compile.runtime.offload.shared.SequenceHandle`
for ids that free themselves), ``site`` an attention site (layer).

``prefill`` without ``q`` only ships the K/V (the caller ran the prompt's attention locally) and
returns at once; the workers' acknowledgements are collected by the next ``wait`` (or ``sync()``),
where a worker error surfaces. With ``q`` the workers run the prompt attention too (needed by modes
that keep state from it, e.g. SWA) and the output is returned.

Failures: a worker that died (a watcher thread sees its process exit) or does not answer within
``timeout_s`` raises ``RuntimeError`` naming the worker; the pool is then *broken*: every other
worker is stopped at once (no process is left behind), every later call raises and says how to
recover (a new pool; a compiled model starts one at its next prefill, see
:mod:`~llm_compile.runtime.offload.shared`). ``shutdown`` (also run by ``atexit`` / garbage
collection through ``weakref.finalize``) reaps the worker processes. An error *inside* a worker
(bad shapes, a decode without prefill) is reported as ``RuntimeError`` too but leaves the pool
usable.

Local pools rendezvous through a ``FileStore`` in a private temporary folder (no listening
socket; the folder is removed once every worker has joined) and bind gloo to 127.0.0.1.
"""
from __future__ import annotations

import datetime
import logging
import os
import threading
import time
import weakref

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from llm_compile.runtime.offload import protocol as P
from llm_compile.runtime.offload.future import OffloadFuture
from llm_compile.runtime.offload.lifecycle import (
    Resources, close_at_exit, connect_watching, finalize_pool, private_dir, startup_timeout,
)
from llm_compile.runtime.offload.modes import AttentionMode
from llm_compile.runtime.offload.workers import LOOPBACK, _spawn_entry, local_store, make_group

log = logging.getLogger(__name__)


class AttentionWorkerPool:
    """Rank 0 of an attention-offload group. Create with :meth:`spawn` or :meth:`connect`."""

    def __init__(self, pg, world_size: int, backend: str, device: torch.device, timeout_s: float,
                 procs: list | None = None, store=None, mode: AttentionMode | None = None,
                 store_dir: str | None = None) -> None:
        self._pg, self.world_size, self.backend = pg, world_size, backend
        self.device, self.timeout_s = torch.device(device), float(timeout_s)
        self.n_workers = world_size - 1
        self._procs = list(procs or [])
        self._res = Resources(pg, store, self._procs, store_dir)
        self._finalizer = weakref.finalize(self, finalize_pool, self._res, pg, self.n_workers, 5.0, str(self.device))
        close_at_exit(self._finalizer)
        self._res.watch()
        self._msg = 0
        self._lock = threading.Lock()
        self._inflight: list[OffloadFuture] = []
        self._closed = False
        self.max_inflight_bytes = 64 << 20
        """Request bytes held for unanswered requests before the pool waits for the oldest."""
        if mode is not None:
            self.set_mode(mode)

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def spawn(cls, n_workers: int, timeout_s: float = 60.0, *, mode: AttentionMode | None = None,
              threads_per_worker: int = 1, startup_timeout_s: float | None = None) -> "AttentionWorkerPool":
        """Start ``n_workers`` local CPU worker processes (``torch.multiprocessing``, start method
        "spawn"), gloo on 127.0.0.1, rendezvous through a ``FileStore`` in a private folder.
        Start-up may take ``startup_timeout_s`` (default :func:`~llm_compile.runtime.offload.
        lifecycle.startup_timeout` of ``timeout_s``)."""
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"llmaccel offload: n_workers must be an int >= 1, got {n_workers!r}")
        startup = float(startup_timeout_s or startup_timeout(timeout_s))
        world = n_workers + 1
        store_dir = private_dir()
        path = os.path.join(store_dir, "rendezvous")
        store = local_store(path, world, startup)
        ctx = torch.multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_spawn_entry, name=f"llmaccel-attn-worker-{r}", daemon=True,
                             args=(path, r, world, "gloo", startup, threads_per_worker,
                                   logging.getLogger().getEffectiveLevel(), os.getpid()))
                 for r in range(1, world)]
        t0 = time.monotonic()
        try:
            for p in procs:
                p.start()
            pg = connect_watching(lambda: make_group("gloo", store, 0, world, startup, LOOPBACK), procs,
                                  startup, store, f"(offload.timeout_s={timeout_s:g} x {startup / timeout_s:g})")
        except BaseException:
            Resources(None, None, procs, store_dir).kill_all()
            Resources(None, None, [], store_dir).drop_store()
            raise
        pool = cls(pg, world, "gloo", torch.device("cpu"), timeout_s, procs, store, mode, store_dir)
        pool.ping()  # every worker has finished its rendezvous (gloo mesh complete) and serves
        pool._res.drop_store()  # nobody needs the rendezvous any more
        log.info("spawned %d attention workers (pids %s) in %.1fs", n_workers, [p.pid for p in procs],
                 time.monotonic() - t0)
        return pool

    @classmethod
    def connect(cls, init_method: str, world_size: int, timeout_s: float = 60.0, *,
                backend: str = "auto", mode: AttentionMode | None = None,
                startup_timeout_s: float | None = None) -> "AttentionWorkerPool":
        """Join, as rank 0, workers started elsewhere (``python -m llm_compile.runtime.offload.workers``
        under ``torchrun``); blocks until all ``world_size - 1`` workers have joined. The
        ``init_method`` rendezvous and the connections are not authenticated: trusted networks only."""
        startup = float(startup_timeout_s or max(startup_timeout(timeout_s), 300.0))
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        store, _, _ = next(dist.rendezvous(init_method, 0, world_size,
                                           timeout=datetime.timedelta(seconds=startup)))
        pg = make_group(backend, store, 0, world_size, startup)
        return cls(pg, world_size, backend, device, timeout_s, None, store, mode)

    # -- public API ---------------------------------------------------------------------------
    def prefill(self, seq_id: int, site: int, k: Tensor, v: Tensor, q: Tensor | None = None,
                scale: float | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
                mode: AttentionMode | None = None) -> Tensor | None:
        """Reset (seq_id, site) and store the prompt K/V ``[B, Hkv, L, D]`` on the workers. With
        ``q``, the workers also attend and the output is returned; without, returns ``None`` at once."""
        if mode is not None:
            self.set_mode(mode, seq_id, site)
        if q is not None:
            return self._attend(seq_id, site, q, k, v, scale, attn_mask, is_causal, True, -1, "prefill").wait()
        self._attend(seq_id, site, None, k, v, 0.0, None, False, True, -1, "prefill")
        return None

    def decode_async(self, seq_id: int, site: int, q: Tensor, k_new: Tensor, v_new: Tensor, scale: float,
                     attn_mask: Tensor | None = None, is_causal: bool = False,
                     cached_len: int | None = None) -> OffloadFuture:
        """Send one decode step of (seq_id, site); ``wait()`` on the result gives ``[B, Hq, Lq, Dv]``."""
        return self._attend(seq_id, site, q, k_new, v_new, scale, attn_mask, is_causal, False,
                            -1 if cached_len is None else int(cached_len), "decode")

    def decode(self, seq_id: int, site: int, q: Tensor, k_new: Tensor, v_new: Tensor, scale: float,
               attn_mask: Tensor | None = None, is_causal: bool = False, cached_len: int | None = None) -> Tensor:
        """``llmaccel::attention(q, k_new, v_new, <cache>, <cache>, attn_mask, scale, is_causal)``
        with the cache of sequence ``seq_id`` held by the workers (k_new/v_new appended to it first)."""
        return self.decode_async(seq_id, site, q, k_new, v_new, scale, attn_mask, is_causal, cached_len).wait()

    def sync(self) -> None:
        """Collect every request still in flight (raises a store-only prefill's worker error;
        other futures keep their result or error for their own ``wait``)."""
        if self._inflight:
            self._collect_until(self._inflight[-1])

    def _collect_until(self, fut: OffloadFuture) -> None:
        while self._inflight and not fut.done:
            first = self._inflight.pop(0)
            first._collect()
            if first._error is not None and first._out_shape is None and first is not fut:
                raise RuntimeError(f"llmaccel offload: {first._what} failed on {first._error}")

    def kv_bytes(self, allocated: bool = False) -> list[int]:
        """KV bytes each worker holds (in use, or allocated with ``allocated=True``)."""
        vals = self._simple(P.OP_KV_BYTES, "kv_bytes")
        return [v[1] if allocated else v[0] for v in vals]

    def local_bytes(self) -> int:
        """Bytes of request buffers this process still holds for in-flight requests."""
        return sum(f.nbytes_held() for f in self._inflight)

    def release(self, seq_id: int, site: int = -1) -> int:
        """Drop the KV of sequence ``seq_id`` (one site, or all with -1) on every worker; returns
        the entries freed."""
        return sum(v[0] for v in self._simple(P.OP_RELEASE, "release", seq_id=seq_id, site=site))

    def set_mode(self, mode: AttentionMode, seq_id: int = -1, site: int = -1) -> None:
        """Set the workers' default attention mode, or the mode of one (seq_id, site) (from its next
        prefill on). Modes travel as JSON specs (:meth:`AttentionMode.to_spec`)."""
        self._simple(P.OP_SET_MODE, "set_mode", seq_id=seq_id, site=site, payload=P.json_payload(mode.to_spec()))

    def ping(self) -> list[int]:
        """The workers' process ids (round trip to every worker)."""
        return [v[0] for v in self._simple(P.OP_PING, "ping")]

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def shutdown(self, join_s: float = 5.0) -> None:
        """Stop the workers (shutdown request, then terminate/kill stragglers). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._inflight.clear()
        self._res.closing.set()  # the workers' exits from here on are expected
        if self.broken is None:
            try:
                self._simple(P.OP_SHUTDOWN, "shutdown", timeout_s=min(self.timeout_s, join_s), closing=True)
            except RuntimeError as e:
                log.warning("llmaccel offload: graceful shutdown failed: %s", e)
        self._finalizer.detach()
        # a broken pool: its workers were stopped already; reap what is left
        finalize_pool(self._res, self._pg, self.n_workers, join_s if self.broken is None else 1.0, str(self.device))
        self._pg = None

    @property
    def broken(self) -> str | None:
        """Why the pool failed (``None`` while it is usable)."""
        return self._res.broken

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # -- internals ----------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("llmaccel offload: the attention worker pool was shut down")
        if self.broken is not None:
            raise RuntimeError(self.broken_message())
        for r, p in enumerate(self._procs, 1):
            if not p.is_alive():
                self._fail(f"attention worker rank {r} died (pid {p.pid}, exit code {p.exitcode})")

    def broken_message(self) -> str:
        return (f"llmaccel offload: the attention worker pool is broken ({self.broken}); all its workers "
                "were stopped and the KV cache they held is lost. Start the sequence again from its "
                "prompt: a model compiled with offload starts fresh workers at its next prefill "
                "(using AttentionWorkerPool directly: create a new pool)")

    def _fail(self, msg: str, cause: BaseException | None = None):
        first = self.broken is None
        self._res.fail(msg)  # first fault: stop every (local) worker now
        if first and not self._procs and self._pg is not None:  # remote workers: ask them to stop
            hdr = P.Header(P.OP_SHUTDOWN, flags=P.FLAG_NOW).to_tensor(self.device)
            for r in range(1, self.world_size):
                try:
                    self._pg.send([hdr], r, P.TAG_REQUEST).wait(datetime.timedelta(seconds=1))
                except Exception:  # that one is gone or stuck
                    pass
        raise RuntimeError(f"llmaccel offload: {msg}; all attention workers were stopped") from cause

    def _wait(self, work, rank: int, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            work.wait(datetime.timedelta(seconds=remaining))
        except Exception as e:
            timed_out = time.monotonic() >= deadline - 0.05
            if self._procs and not timed_out:  # a broken connection: give the watcher (which
                settle = time.monotonic() + 1.0  # reaps the dead process) time to say who died
                while self.broken is None and time.monotonic() < settle:
                    time.sleep(0.02)
            if self.broken is not None:
                raise RuntimeError(self.broken_message()) from e
            proc = self._procs[rank - 1] if rank - 1 < len(self._procs) else None
            if proc is not None and (proc.join(0.2) or not proc.is_alive()):
                state = f"died (pid {proc.pid}, exit code {proc.exitcode})"
            elif timed_out:
                state = f"did not answer within {self.timeout_s:.1f}s"
            else:
                state = "connection failed"
            self._fail(f"attention worker rank {rank} {state} during {what}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}", e)

    def _send_request(self, rank: int, hdr: P.Header, payload: Tensor | None, reply_nbytes: int) -> dict:
        hdr.msg = self._msg = self._msg + 1
        hdr.payload_nbytes = 0 if payload is None else payload.numel()
        htensor = hdr.to_tensor(self.device)
        reply = torch.empty(P.STATUS_BYTES + reply_nbytes, dtype=torch.uint8, device=self.device)
        keep = [htensor] + ([payload] if payload is not None and payload.numel() else [])
        try:
            sends = [self._pg.send([t], rank, P.TAG_REQUEST) for t in keep]
            recv = self._pg.recv([reply], rank, P.TAG_REPLY)
        except Exception as e:
            self._fail(f"cannot send to attention worker rank {rank}: {str(e).splitlines()[0][:200]}", e)
        return {"rank": rank, "sends": sends, "recv": recv, "reply": reply, "keep": keep}

    def _simple(self, op: int, what: str, seq_id: int = 0, site: int = 0, payload: Tensor | None = None,
                timeout_s: float | None = None, closing: bool = False) -> list[tuple[int, int]]:
        """One status-only request to every worker; returns their (v1, v2)."""
        with unset_fake_temporarily():  # may be called while a compiler traces (e.g. from a pass)
            return self._simple_real(op, what, seq_id, site, payload, timeout_s, closing)

    def _simple_real(self, op, what, seq_id, site, payload, timeout_s, closing):
        if not closing:
            self._check_usable()
            self.sync()
        if payload is not None:
            payload = payload.to(self.device)
        with self._lock:
            parts = [self._send_request(r, P.Header(op, seq_id=seq_id, site=site), payload, 0)
                     for r in range(1, self.world_size)]
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        vals, errors = [], []
        for part in parts:  # consume every reply before raising
            self._wait(part["recv"], part["rank"], deadline, what)
            for w in part["sends"]:
                self._wait(w, part["rank"], deadline, what)
            status, _, v1, v2, msg = P.read_status(part["reply"])
            if status != P.STATUS_OK:
                errors.append(msg)
            vals.append((v1, v2))
        if errors:
            raise RuntimeError(f"llmaccel offload: {what} failed on {'; '.join(errors)}")
        return vals

    def _attend(self, seq_id, site, q, k, v, scale, attn_mask, is_causal, reset, cached_len, what) -> OffloadFuture:
        self._check_usable()
        if any(is_fake(t) for t in (q, k, v, attn_mask) if t is not None):
            raise RuntimeError("llmaccel offload: fake tensors cannot be sent to attention workers "
                               "(the pool was called while tracing; use llmaccel::offload_attention)")
        B, hkv, ln, D = k.shape
        dv = v.shape[-1]
        hq = q.shape[1] if q is not None else hkv
        if hq % hkv:
            raise ValueError(f"llmaccel offload: {hq} query heads is not a multiple of {hkv} KV heads")
        group = hq // hkv
        mask = None
        if attn_mask is not None:
            mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            if mask.shape[1] not in (1, hq):
                raise ValueError(f"llmaccel offload: mask {tuple(attn_mask.shape)} does not broadcast over {hq} heads")
        flags = (P.FLAG_RESET if reset else 0) | (P.FLAG_CAUSAL if is_causal else 0) | (P.FLAG_HAS_Q if q is not None else 0)
        dt = q.dtype if q is not None else k.dtype
        parts = []
        with self._lock:
            for w, (s, e) in enumerate(P.split_heads(hkv, self.n_workers)):
                if s == e:
                    continue
                tensors = [k[:, s:e].to(dt), v[:, s:e].to(dt)]
                hdr = P.Header(P.OP_ATTEND, seq_id=int(seq_id), site=int(site), batch=B,
                               q_heads=(e - s) * group, kv_heads=e - s, new_len=ln, head_dim=D, v_dim=dv,
                               dtype=P.dtype_code(dt), scale_bits=P.float_bits(scale or 0.0), flags=flags,
                               cached_len=cached_len, head_offset=s)
                if q is not None:
                    tensors.insert(0, q[:, s * group:e * group])
                    hdr.q_len = q.shape[2]
                if mask is not None:
                    m = mask[:, s * group:e * group] if mask.shape[1] == hq and hq > 1 else mask
                    hdr.mask_kind = P.MASK_BOOL if m.dtype == torch.bool else P.MASK_FLOAT
                    hdr.mask_dtype = P.dtype_code(m.dtype)
                    hdr.mask_s0, hdr.mask_s1, hdr.mask_s2, hdr.mask_s3 = m.shape
                    tensors.append(m)
                payload = P.pack([t.detach() for t in tensors], self.device)
                part = self._send_request(w + 1, hdr, payload, 0 if q is None else
                                          P.nbytes_of((B, hdr.q_heads, hdr.q_len, dv), dt))
                part["q_heads"] = (s * group, e * group)
                parts.append(part)
            out_shape = None if q is None else (B, hq, q.shape[2], dv)
            dev = q.device if q is not None else k.device
            fut = OffloadFuture(self, parts, out_shape, dt, dev, f"{what} of sequence {seq_id} site {site}")
            self._inflight.append(fut)
        self._reap()
        return fut

    def _reap(self) -> None:
        """Free the send buffers of store-only prefills (nobody waits on those): collect leading
        ones whose transfers are complete (non-blocking), and, while more than
        ``max_inflight_bytes`` are held (a prefill of many layers ships the whole prompt KV without
        waiting), the oldest (blocking). Without this the compute process would hold a copy of the
        whole prompt KV until the next decode. A worker error of a reaped prefill raises here."""
        def finished(f: OffloadFuture) -> bool:
            return all(w.is_completed() for part in f._parts for w in [part["recv"], *part["sends"]])

        while self._inflight and self._inflight[0]._out_shape is None and (
                finished(self._inflight[0]) or self.local_bytes() > self.max_inflight_bytes):
            first = self._inflight[0]
            self._collect_until(first)
            if first._error is not None:
                raise RuntimeError(f"llmaccel offload: {first._what} failed on {first._error}")
