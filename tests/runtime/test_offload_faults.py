"""Attention-offload hardening: loopback-only rendezvous, no pickles on the wire, all workers stopped
at the first fault, recovery by a new prefill, bounded and explained start-up, clean exits."""
from __future__ import annotations

import ast
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from llm_compile.config import OffloadConfig
from llm_compile.ops.attention import dense_attention
from llm_compile.runtime.offload import AttentionWorkerPool, SharedPool
from llm_compile.runtime.offload import protocol as P
from llm_compile.runtime.offload.modes import CallableMode, DenseMode, SWAMode, mode_from_spec

PKG = pathlib.Path(__file__).resolve().parents[2] / "llm_compile" / "runtime" / "offload"
B, HQ, HKV, D = 1, 4, 2, 8


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _children() -> set[int]:
    """Live (non-zombie) child processes of this process, but multiprocessing's resource tracker."""
    me = os.getpid()
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            if b"resource_tracker" not in cmd:  # multiprocessing's helper, not a worker
                out.add(int(d))
    return out


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _listening(pids) -> list[str]:
    """``addr:port`` of every TCP socket in LISTEN state owned by one of ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            addr, port = cols[1].split(":")
            if v6:
                words = [addr[i:i + 8] for i in range(0, 32, 8)]
                raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
                ip = raw.hex()
                found.append(f"[{ip}]:{int(port, 16)}")
            else:
                found.append(".".join(str(b) for b in bytes.fromhex(addr)[::-1]) + f":{int(port, 16)}")
    return found


_LOOPBACK6 = ("0" * 31 + "1", "0" * 20 + "ffff" + "7f000001")


def test_local_pool_listens_on_loopback_only_and_drops_its_rendezvous():
    pool = AttentionWorkerPool.spawn(2, timeout_s=30)
    try:
        socks = _listening([os.getpid(), *pool.worker_pids()])
        assert socks, "gloo listens somewhere"
        wide = [s for s in socks if not (s.startswith("127.") or s[1:].split("]")[0] in _LOOPBACK6)]
        assert not wide, f"listening beyond 127.0.0.1: {wide}"
        assert pool._res.store_dir is None  # the rendezvous folder is gone once the group is up
        pool.prefill(1, 0, _rand(B, HKV, 3, D, seed=1), _rand(B, HKV, 3, D, seed=2))
        assert len(pool.ping()) == 2
    finally:
        pool.shutdown()


def test_no_pickle_on_the_wire():
    for f in PKG.glob("*.py"):  # nothing in the offload runtime unpickles (or even imports pickle)
        tree = ast.parse(f.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"pickle", "cPickle", "dill", "cloudpickle"}, f.name
    hdr = P.Header(P.OP_PING).to_tensor()
    hdr[1] = 99  # unknown op code
    with pytest.raises(RuntimeError, match="unknown op code 99"):
        P.Header.from_tensor(hdr)
    hdr = P.Header(P.OP_PING).to_tensor()
    hdr[0] = 1234
    with pytest.raises(RuntimeError, match="bad header magic"):
        P.Header.from_tensor(hdr)
    from llm_compile.config import SWAConfig

    for mode in (DenseMode(), SWAMode(SWAConfig(sparsity=0.5)), CallableMode("a.b:c", {"x": 1})):
        back = mode_from_spec(P.read_json(P.json_payload(mode.to_spec())))
        assert type(back) is type(mode) and repr(back) == repr(mode)
    for bad in ({"kind": "pickle"}, {"kind": "dense", "x": 1}, [1], {"kind": "swa", "config": {"evil": 1}}):
        with pytest.raises(ValueError):
            mode_from_spec(bad)


def test_startup_timeout_names_what_timed_out_and_leaves_no_process():
    before = _children()
    with pytest.raises(RuntimeError, match=r"start-up timed out after \d+s .*rank\(s\) 1 \(pid \d+\) had "
                                           r"not started.*raise offload.timeout_s"):
        AttentionWorkerPool.spawn(1, timeout_s=30, startup_timeout_s=0.3)
    assert _wait(lambda: _children() <= before, 5.0)


def test_startup_limit_follows_timeout_s():
    from llm_compile.runtime.offload.lifecycle import startup_timeout

    assert startup_timeout(60) == 300 and startup_timeout(200) == 1000 and startup_timeout(1) == 60


def _ref(k, v, q, kn, vn, scale):
    return dense_attention(q, torch.cat([k, kn], -2), torch.cat([v, vn], -2), None, scale, False)


def _fault_and_recover(shared: SharedPool, seed: int) -> None:
    """One sequence on fresh workers, one worker killed while idle: every worker stops without any
    call; decode says how to recover; a new prefill starts fresh workers that give exact results."""
    seq = shared.new_sequence()
    k, v = _rand(B, HKV, 4, D, seed=seed), _rand(B, HKV, 4, D, seed=seed + 1)
    shared.prefill(seq.seq_id, 0, k, v)
    pids = shared.worker_pids()
    assert set(pids) == _children()
    os.kill(pids[0], signal.SIGKILL)
    assert _wait(lambda: not _children(), 10.0), f"workers left after a fault: {_children()}"
    q, kn, vn = _rand(B, HQ, 1, D, seed=seed + 2), _rand(B, HKV, 1, D, seed=seed + 3), _rand(B, HKV, 1, D, seed=seed + 4)
    with pytest.raises(RuntimeError, match=r"rank 1 died .*Start the sequence again from its prompt|"
                                           r"rank 1 died .*a new prefill"):
        shared.decode(seq.seq_id, 0, q, kn, vn, 0.3, cached_len=4)
    with pytest.raises(RuntimeError, match="Start the sequence again"):  # still: no silent restart at decode
        shared.decode(seq.seq_id, 0, q, kn, vn, 0.3, cached_len=4)
    seq2 = shared.new_sequence()  # a new prefill restarts the workers
    assert seq2.seq_id > seq.seq_id
    shared.prefill(seq2.seq_id, 0, k, v)
    out = shared.decode(seq2.seq_id, 0, q, kn, vn, 0.3, cached_len=4)
    torch.testing.assert_close(out, _ref(k, v, q, kn, vn, 0.3), atol=1e-5, rtol=1e-5)
    assert set(shared.worker_pids()) == _children() and not set(pids) & _children()


def test_first_fault_stops_all_workers_and_a_new_prefill_recovers():
    shared = SharedPool(OffloadConfig(workers=2, timeout_s=30))
    try:
        _fault_and_recover(shared, 10)
        assert shared.restarts == 1
    finally:
        shared.shutdown()
    assert _wait(lambda: not _children(), 5.0)


@pytest.mark.slow
def test_ten_faults_in_a_loop_leave_no_extra_process():
    shared = SharedPool(OffloadConfig(workers=1, timeout_s=30))
    try:
        for i in range(10):
            _fault_and_recover(shared, 100 + i)
            assert len(_children()) == 1
    finally:
        shared.shutdown()
    assert _wait(lambda: not _children(), 5.0)


def test_hung_worker_stops_the_pool():
    pool = AttentionWorkerPool.spawn(2, timeout_s=2.0)
    pool.prefill(1, 0, _rand(B, HKV, 3, D, seed=1), _rand(B, HKV, 3, D, seed=2))
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    with pytest.raises(RuntimeError, match="rank 1 did not answer within 2.0s.*all attention workers were stopped"):
        pool.decode(1, 0, _rand(B, HQ, 1, D, seed=3), _rand(B, HKV, 1, D, seed=4), _rand(B, HKV, 1, D, seed=5), 0.3)
    assert _wait(lambda: not _children(), 5.0)  # both workers, without a shutdown() call
    with pytest.raises(RuntimeError, match="broken.*Start the sequence again.*create a new pool"):
        pool.kv_bytes()
    pool.shutdown()


_EXIT_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from model_zoo import build

    if __name__ == "__main__":
        model = build("llama")
        model.forward = torch.compile(model.forward, backend="llmaccel",
                                      options={{"offload": {{"workers": 2, "timeout_s": 60}}, "inner": "eager"}})
        ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        from llm_compile.runtime.offload.shared import _POOLS
        pids = [p for s in _POOLS.values() for p in s.worker_pids()]
        print("PIDS", *pids, flush=True)
        # a normal exit: no shutdown() call
""")


def test_workers_exit_cleanly_at_interpreter_exit(tmp_path):
    script = tmp_path / "run_offload.py"
    script.write_text(_EXIT_SCRIPT.format(tests=str(pathlib.Path(__file__).resolve().parents[1])))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = [int(x) for line in proc.stdout.splitlines() if line.startswith("PIDS") for x in line.split()[1:]]
    assert len(pids) == 2
    assert "did not exit" not in proc.stderr and "terminat" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert "died" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _wait(lambda: all(not os.path.exists(f"/proc/{p}") for p in pids), 5.0)


_NO_GUARD = textwrap.dedent("""
    import torch
    from llm_compile.runtime.offload.shared import get_pool
    from llm_compile.config import OffloadConfig
    get_pool(OffloadConfig(workers=1, timeout_s=60))  # no `if __name__ == "__main__":` guard
    print("STARTED")
""")


def test_missing_main_guard_is_explained(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(_NO_GUARD)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "STARTED" not in proc.stdout
    assert "exited with code 1 during start-up" in proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr


@pytest.mark.parametrize("bad,key", [({"workers": 1.5}, "offload.workers"), ({"workers": "2"}, "offload.workers"),
                                     ({"workers": True}, "offload.workers"), ({"init_method": 5}, "offload.init_method"),
                                     ({"init_method": "10.0.0.1"}, "offload.init_method"),
                                     ({"timeout_s": "5"}, "offload.timeout_s"), ({"timeout_s": 0}, "offload.timeout_s"),
                                     ({"overlap": "yes"}, "offload.overlap")])
def test_bad_offload_option_values_are_refused_when_parsed(bad, key):
    from llm_compile.config import OptionsError, parse_options

    with pytest.raises(OptionsError, match=key.replace(".", r"\.")):
        parse_options({"offload": bad})
