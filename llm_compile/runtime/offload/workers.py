"""Attention workers (Lamina's memory devices): hold the KV cache of offloaded layers, run attention.

Every worker (rank >= 1 of a ``torch.distributed`` group whose rank 0 is the compute process) owns
a contiguous range of KV heads (and the matching query heads) of every offloaded site, keyed by
``(seq_id, site)``: one entry per sequence (the compute side allocates the id at prefill and
releases it when the sequence's cache dies) and attention site. It serves requests
(:mod:`~llm_compile.runtime.offload.protocol`) one at a time, in arrival order, until a shutdown
request or until rank 0 goes away (the point-to-point connection breaks and the worker exits).

KV is kept per (seq_id, site) in buffers that grow by doubling (amortised O(1) append per decode
step, no per-step ``cat`` of the whole cache); attention runs over views of them through the
site's :class:`~llm_compile.runtime.offload.modes.AttentionMode` (dense by default).

Start workers on other machines with ``torchrun`` (the compute process is rank 0 and calls
:meth:`AttentionWorkerPool.connect <llm_compile.runtime.offload.pool.AttentionWorkerPool.connect>`)::

    # compute machine (rank 0), in the model process:
    pool = AttentionWorkerPool.connect("tcp://10.0.0.1:29600", world_size=3, timeout_s=60)
    # memory machine: two workers, ranks 1 and 2
    torchrun --nproc-per-node=2 -m llm_compile.runtime.offload \
        --init-method tcp://10.0.0.1:29600 --world-size 3 --rank-offset 1

(``-m llm_compile.runtime.offload`` runs :func:`main` of this module.) A remote group trusts its
network: the rendezvous store and the gloo/NCCL connections carry no authentication, so use
``init_method`` only on a private, trusted network. Local pools (spawned processes) rendezvous
through a ``FileStore`` in a private temporary folder and bind gloo to 127.0.0.1.

Without ``--rank-offset`` the rank is torchrun's ``RANK`` (for a torchrun job that also launches the
compute process as rank 0), or ``--rank``.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch import Tensor

from llm_compile.runtime.kv.buffer import SiteKV
from llm_compile.runtime.offload import protocol as P
from llm_compile.runtime.offload.modes import AttentionMode, DenseMode, mode_from_spec

log = logging.getLogger(__name__)

SERVE_TIMEOUT = datetime.timedelta(days=365)
"""How long an idle worker waits for the next request (it exits earlier if rank 0 disconnects)."""
FIN_TIMEOUT_S = 30.0
"""After answering a shutdown, how long a worker waits for rank 0's final header."""


LOOPBACK = "127.0.0.1"


def make_group(backend: str, store, rank: int, world_size: int, timeout_s: float, host: str | None = None):
    """A gloo or NCCL process-group backend over ``store`` (not the global default group, so several
    pools can live in one process next to a user's own ``torch.distributed`` group). With ``host``,
    gloo binds its sockets to that address (local pools: :data:`LOOPBACK`)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore("llmaccel_offload", store)
    if backend == "gloo":
        if host is None:
            return dist.ProcessGroupGloo(store, rank, world_size, timeout)
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        opts._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"llmaccel offload: unknown transport {backend!r} (gloo or nccl)")


class AttentionWorker:
    """The request loop of one worker rank."""

    def __init__(self, pg, rank: int, device: torch.device, mode: AttentionMode | None = None) -> None:
        self.pg, self.rank, self.device = pg, rank, torch.device(device)
        self.default_mode: AttentionMode = mode or DenseMode()
        self.modes: dict[tuple[int, int], AttentionMode] = {}
        """Per (seq_id, site) modes set with OP_SET_MODE."""
        self.kv: dict[tuple[int, int], SiteKV] = {}

    # -- transport ----------------------------------------------------------------------------
    def _recv(self, t: Tensor, timeout=SERVE_TIMEOUT) -> None:
        self.pg.recv([t], 0, P.TAG_REQUEST).wait(timeout)

    def _reply(self, buf: Tensor) -> None:
        self.pg.send([buf], 0, P.TAG_REPLY).wait(SERVE_TIMEOUT)

    def serve(self) -> None:
        """Serve until shutdown; returns normally then, raises if rank 0 disconnects."""
        log.info("attention worker rank %d serving on %s", self.rank, self.device)
        hbuf = P.empty_header(self.device)
        while True:
            self._recv(hbuf)
            hdr = P.Header.from_tensor(hbuf)
            payload = None
            if hdr.payload_nbytes:
                payload = torch.empty(hdr.payload_nbytes, dtype=torch.uint8, device=self.device)
                self._recv(payload)
            if hdr.op == P.OP_SHUTDOWN and hdr.flags & P.FLAG_NOW:
                log.info("attention worker rank %d: stop", self.rank)
                return
            if hdr.op == P.OP_SHUTDOWN:
                self._reply(P.make_status(P.STATUS_OK, hdr.msg, device=self.device))
                # Stay connected until rank 0 has every worker's answer (its "fin" header): a worker
                # that exits early breaks the gloo mesh of the others before they have answered.
                try:
                    self._recv(hbuf, datetime.timedelta(seconds=FIN_TIMEOUT_S))
                except Exception:
                    pass
                log.info("attention worker rank %d: shutdown", self.rank)
                return
            out_bytes = self.reply_nbytes(hdr)
            try:
                v1, v2, out = self.handle(hdr, payload)
                buf = P.make_status(P.STATUS_OK, hdr.msg, v1, v2, device=self.device, extra=out_bytes)
                if out is not None:
                    buf[P.STATUS_BYTES:].copy_(P.as_bytes(out))
            except Exception as e:  # reported to rank 0; the stream stays in sync
                log.warning("attention worker rank %d: %s failed: %s", self.rank, P.OP_NAMES.get(hdr.op), e)
                log.debug("traceback", exc_info=True)
                msg = f"worker rank {self.rank}: {type(e).__name__}: {e}"
                buf = P.make_status(P.STATUS_ERROR, hdr.msg, message=msg, device=self.device, extra=out_bytes)
            self._reply(buf)

    @staticmethod
    def reply_nbytes(hdr: P.Header) -> int:
        """Output bytes following the status block (the sender computes the same number)."""
        if hdr.op == P.OP_ATTEND and hdr.flags & P.FLAG_HAS_Q:
            return P.nbytes_of((hdr.batch, hdr.q_heads, hdr.q_len, hdr.v_dim), P.code_dtype(hdr.dtype))
        return 0

    # -- requests -----------------------------------------------------------------------------
    def handle(self, hdr: P.Header, payload: Tensor | None) -> tuple[int, int, Tensor | None]:
        if hdr.op == P.OP_ATTEND:
            return 0, 0, self.attend(hdr, payload)
        if hdr.op == P.OP_KV_BYTES:
            return (sum(s.nbytes() for s in self.kv.values()),
                    sum(s.nbytes(allocated=True) for s in self.kv.values()), None)
        if hdr.op == P.OP_RELEASE:
            whole = hdr.seq_id == P.base_sequence(hdr.seq_id)  # with its sub-batches

            def hit(k):
                return (P.base_sequence(k[0]) == hdr.seq_id if whole else k[0] == hdr.seq_id) \
                    and hdr.site in (-1, k[1])

            keys = [k for k in self.kv if hit(k)]
            for k in keys:
                del self.kv[k]
            for k in [k for k in self.modes if hit(k)]:
                del self.modes[k]
            return len(keys), 0, None
        if hdr.op == P.OP_SET_MODE:
            mode = mode_from_spec(P.read_json(payload if payload is not None else torch.empty(0, dtype=torch.uint8)))
            if hdr.seq_id == -1 and hdr.site == -1:
                self.default_mode = mode
            else:
                self.modes[(hdr.seq_id, hdr.site)] = mode
            return 0, 0, None
        if hdr.op == P.OP_PING:
            return os.getpid(), self.rank, None
        raise RuntimeError(f"unknown op code {hdr.op}")

    def attend(self, hdr: P.Header, payload: Tensor | None) -> Tensor | None:
        dtype = P.code_dtype(hdr.dtype)
        B, hq, hkv, D, Dv = hdr.batch, hdr.q_heads, hdr.kv_heads, hdr.head_dim, hdr.v_dim
        has_q = bool(hdr.flags & P.FLAG_HAS_Q)
        specs = []
        if has_q:
            specs.append(((B, hq, hdr.q_len, D), dtype))
        specs += [((B, hkv, hdr.new_len, D), dtype), ((B, hkv, hdr.new_len, Dv), dtype)]
        if hdr.mask_kind != P.MASK_NONE:
            specs.append((hdr.mask_shape, P.code_dtype(hdr.mask_dtype)))
        parts = P.unpack(payload if payload is not None else torch.empty(0, dtype=torch.uint8), specs)
        q = parts.pop(0) if has_q else None
        k_new, v_new = parts[0], parts[1]
        mask = parts[2] if len(parts) > 2 else None
        if mask is not None and hdr.mask_kind == P.MASK_BOOL:
            mask = mask.to(torch.bool)
        key = (hdr.seq_id, hdr.site)
        site = self.kv.get(key)
        if hdr.flags & P.FLAG_RESET or site is None:
            if not hdr.flags & P.FLAG_RESET:
                raise RuntimeError(f"no KV cached for sequence {hdr.seq_id} site {hdr.site} (released, or "
                                   "never prefilled): prefill first")
            mode = self.modes.get(key, self.default_mode)
            state = mode.new_state(batch=B, kv_heads=hkv, q_heads=hq, head_dim=D, device=self.device,
                                   head_offset=hdr.head_offset)
            site = self.kv[key] = SiteKV(B, hkv, D, Dv, dtype, self.device, mode, state)
        if hdr.cached_len >= 0 and hdr.cached_len != site.length:
            raise RuntimeError(f"sequence {hdr.seq_id} site {hdr.site}: the model expects "
                               f"{hdr.cached_len} cached tokens, the worker holds {site.length}")
        site.append(k_new, v_new)
        if q is None:
            return None
        out = site.mode.attend(q, site.keys(), site.values(), mask, hdr.scale,
                               bool(hdr.flags & P.FLAG_CAUSAL), site.state)
        return out.to(dtype)


def _worker_device(backend: str) -> torch.device:
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def run_worker(store, rank: int, world_size: int, backend: str, startup_timeout_s: float,
               mode: AttentionMode | None = None, threads: int | None = None, host: str | None = None) -> None:
    """Join the group as worker ``rank`` and serve until shutdown."""
    if rank < 1:
        raise ValueError("llmaccel offload: rank 0 is the compute process; workers are ranks >= 1")
    if threads:
        torch.set_num_threads(threads)
    device = _worker_device(backend)
    store.set(P.started_key(rank), str(os.getpid()))
    pg = make_group(backend, store, rank, world_size, startup_timeout_s, host)
    AttentionWorker(pg, rank, device, mode).serve()


def _watch_parent(parent_pid: int, period_s: float = 0.5) -> None:
    """Exit this worker as soon as its parent (the compute process) is gone, whatever it is doing
    (serving, or still in the rendezvous): a local pool never leaves orphans."""

    def loop():
        while os.getppid() == parent_pid:
            time.sleep(period_s)
        os._exit(3)

    threading.Thread(target=loop, daemon=True, name="llmaccel-parent-watch").start()


def local_store(path: str, world_size: int, timeout_s: float):
    """The rendezvous store of a local pool: a ``FileStore`` (no listening socket) at ``path``,
    inside a folder only this user can read."""
    store = dist.FileStore(path, world_size)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return store


def _spawn_entry(store_path: str, rank: int, world_size: int, backend: str,
                 startup_timeout_s: float, threads: int, log_level: int, parent_pid: int) -> None:
    """Target of :meth:`AttentionWorkerPool.spawn` (``torch.multiprocessing``, start method spawn)."""
    _watch_parent(parent_pid)
    logging.basicConfig(level=log_level, format=f"[offload worker {rank}] %(levelname)s %(message)s")
    try:
        store = local_store(store_path, world_size, startup_timeout_s)
        run_worker(store, rank, world_size, backend, startup_timeout_s, None, threads, LOOPBACK)
    except Exception as e:  # rank 0 went away or broke the protocol: exit quietly-ish
        log.warning("attention worker rank %d exiting: %s", rank, str(e).splitlines()[0][:200])
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing left to clean up; skip a slow interpreter teardown (torch, gloo)


def main(argv: list[str] | None = None) -> int:
    """``python -m llm_compile.runtime.offload``: serve as one worker rank (see module doc)."""
    ap = argparse.ArgumentParser(prog="python -m llm_compile.runtime.offload",
                                 description="llmaccel attention-offload worker (rank >= 1)")
    ap.add_argument("--init-method", default="env://",
                    help="torch.distributed init method of the pool (tcp://HOST:PORT, env://)")
    ap.add_argument("--world-size", type=int, default=None, help="compute rank + workers")
    ap.add_argument("--rank", type=int, default=None, help="this worker's rank (default: $RANK)")
    ap.add_argument("--rank-offset", type=int, default=0,
                    help="added to $RANK (1 when torchrun launches only the workers)")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                    help="transport (default: nccl if CUDA is available, else gloo)")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="rendezvous timeout")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="[offload worker] %(levelname)s %(message)s")
    rank = a.rank if a.rank is not None else int(os.environ["RANK"]) + a.rank_offset
    world = a.world_size if a.world_size is not None else int(os.environ["WORLD_SIZE"]) + a.rank_offset
    backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    store, _, _ = next(dist.rendezvous(a.init_method, rank, world,
                                       timeout=datetime.timedelta(seconds=a.timeout_s)))
    try:
        run_worker(store, rank, world, backend, a.timeout_s, None, a.threads)
    except Exception as e:
        log.error("worker rank %d stopped: %s", rank, str(e).splitlines()[0][:300])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
