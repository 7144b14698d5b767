"""Attention-offload workers started outside the pool (module entry, as under torchrun) and the
clean-up guarantees: no worker outlives its compute process (atexit, or a killed parent)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import torch

from llm_compile.ops.attention import dense_attention
from llm_compile.runtime.offload import AttentionWorkerPool

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return all(_gone(p) for p in pids)


def test_connect_to_workers_started_with_the_module_entry():
    port = _free_port()
    init = f"tcp://127.0.0.1:{port}"
    # what `torchrun --nproc-per-node=2 -m llm_compile.runtime.offload --rank-offset 1 ...`
    # does on another machine: RANK/WORLD_SIZE from the environment, ranks shifted past rank 0
    procs = [subprocess.Popen([sys.executable, "-m", "llm_compile.runtime.offload",
                               "--init-method", init, "--rank-offset", "1", "--backend", "gloo",
                               "--timeout-s", "60", "--threads", "1"],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"})
             for r in range(2)]
    try:
        pool = AttentionWorkerPool.connect(init, world_size=3, timeout_s=30, startup_timeout_s=90)
        assert pool.backend == "gloo" and pool.n_workers == 2
        assert sorted(pool.ping()) == sorted(p.pid for p in procs)
        k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
        pool.prefill(1, 0, k, v)
        q, kn, vn = torch.randn(1, 4, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
        out = pool.decode(1, 0, q, kn, vn, 0.5, cached_len=5)
        ref = dense_attention(q, torch.cat([k, kn], -2), torch.cat([v, vn], -2), None, 0.5, False)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert pool.kv_bytes() == [6 * 4 * 2 * 4] * 2
        pool.shutdown()
        assert [p.wait(timeout=20) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


_SCRIPT = textwrap.dedent("""
    import sys, time
    from llm_compile.runtime.offload import AttentionWorkerPool
    if __name__ == "__main__":
        pool = AttentionWorkerPool.spawn(2, timeout_s=20)
        print(" ".join(map(str, pool.worker_pids())), flush=True)
        if sys.argv[1] == "hang":
            time.sleep(120)
        # "exit": leave without shutdown(); atexit/finalize must reap the workers
""")


def _run_script(tmp_path, how: str):
    path = tmp_path / "make_pool.py"
    path.write_text(_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(path), how], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    pids = [int(x) for x in line.split()]
    assert len(pids) == 2, f"pool did not start: {line!r}"
    return proc, pids


def test_no_orphans_after_exit_without_shutdown(tmp_path):
    proc, pids = _run_script(tmp_path, "exit")
    assert proc.wait(timeout=30) == 0
    assert _wait_gone(pids, 5.0)


def test_no_orphans_after_compute_process_is_killed(tmp_path):
    proc, pids = _run_script(tmp_path, "hang")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_gone(pids, 10.0), "workers outlived their killed compute process"
    finally:
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
