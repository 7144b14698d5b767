"""Attention-offload runtime: local worker pools (gloo on 127.0.0.1) against dense attention.

Pools are module-scoped (process spawn is slow) and created lazily per worker count; every wait is
bounded by the pool's ``timeout_s``. The fault tests run last: they break the pools they use.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from llm_compile.ops.attention import dense_attention
from llm_compile.runtime.offload.modes import CallableMode, SWAMode
from llm_compile.runtime.offload import AttentionWorkerPool
from llm_compile.runtime.offload.protocol import split_heads

TIMEOUT_S = 30.0
B, HQ, HKV, D = 2, 6, 3, 8  # GQA 2; 3 KV heads split unevenly over 2 workers


@pytest.fixture(scope="module")
def pools():
    made: dict[int, AttentionWorkerPool] = {}

    def get(n: int) -> AttentionWorkerPool:
        if n not in made or made[n].broken:
            made[n] = AttentionWorkerPool.spawn(n, timeout_s=TIMEOUT_S)
        return made[n]

    yield get
    for p in made.values():
        p.shutdown()
    assert not torch.multiprocessing.active_children()


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


class Ref:
    """The local truth: a full K/V cache and dense attention over cat([cache, new])."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def step(self, q, kn, vn, scale, mask=None):
        self.k, self.v = torch.cat([self.k, kn], -2), torch.cat([self.v, vn], -2)
        return dense_attention(q, self.k, self.v, mask, scale, False)


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_decode_matches_dense_gqa_batch_sites_instances(pools, n_workers):
    pool = pools(n_workers)
    scale = D ** -0.5
    refs = {}
    for inst in (11, 12):  # two model instances, two sites each, different prompt lengths
        for site in (0, 1):
            L = 5 + site + inst % 2
            k, v = _rand(B, HKV, L, D, seed=inst * 10 + site), _rand(B, HKV, L, D, seed=inst * 10 + site + 5)
            assert pool.prefill(inst, site, k, v) is None
            refs[inst, site] = Ref(k, v)
    for step in range(4):
        for (inst, site), ref in refs.items():
            s = 100 * step + 10 * inst + site
            q, kn, vn = _rand(B, HQ, 1, D, seed=s), _rand(B, HKV, 1, D, seed=s + 1), _rand(B, HKV, 1, D, seed=s + 2)
            n = ref.k.shape[-2] + 1
            mask = None
            if step == 1:  # additive float mask, per sequence
                mask = _rand(B, 1, 1, n, seed=s + 3)
            elif step == 2:  # bool mask per query head: sequence 1 ignores its oldest two keys
                mask = torch.ones(B, HQ, 1, n, dtype=torch.bool)
                mask[1, :, :, :2] = False
            cached = ref.k.shape[-2]
            out = pool.decode(inst, site, q, kn, vn, scale, attn_mask=mask, cached_len=cached)
            expect = ref.step(q, kn, vn, scale, mask)
            assert out.shape == (B, HQ, 1, D)
            torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    # placement: every worker holds exactly its KV heads of every (instance, site); rank 0 none
    per_head_token = B * D * 2 * 4  # k and v, fp32
    tokens = sum(r.k.shape[-2] for r in refs.values())
    expect = [(e - s) * tokens * per_head_token for s, e in split_heads(HKV, n_workers)]
    assert pool.kv_bytes() == expect
    assert sum(pool.kv_bytes()) == B * HKV * tokens * D * 2 * 4
    assert pool.local_bytes() == 0
    assert pool.release(11) == 2 * sum(1 for s, e in split_heads(HKV, n_workers) if e > s)
    assert sum(pool.kv_bytes()) == B * HKV * sum(refs[12, s].k.shape[-2] for s in (0, 1)) * D * 2 * 4
    pool.release(12)


def test_more_workers_than_kv_heads_and_new_prefill_resets(pools):
    pool = pools(3)
    k, v = _rand(1, 2, 9, D, seed=1), _rand(1, 2, 9, D, seed=2)  # 2 KV heads, 3 workers: one idle
    pool.prefill(7, 3, k, v)
    assert pool.kv_bytes()[2] == 0 and pool.kv_bytes()[0] == 9 * D * 2 * 4
    k2, v2 = _rand(1, 2, 4, D, seed=3), _rand(1, 2, 4, D, seed=4)  # new sequence: reset
    pool.prefill(7, 3, k2, v2)
    ref = Ref(k2, v2)
    q, kn, vn = _rand(1, 4, 1, D, seed=5), _rand(1, 2, 1, D, seed=6), _rand(1, 2, 1, D, seed=7)
    out = pool.decode(7, 3, q, kn, vn, 0.3, cached_len=4)
    torch.testing.assert_close(out, ref.step(q, kn, vn, 0.3), atol=1e-5, rtol=1e-5)
    assert sum(pool.kv_bytes()) == 2 * 5 * D * 2 * 4
    pool.release(7)


def test_worker_errors_are_reported_and_pool_stays_usable(pools):
    pool = pools(2)
    q, kn, vn = _rand(1, HQ, 1, D, seed=1), _rand(1, HKV, 1, D, seed=2), _rand(1, HKV, 1, D, seed=3)
    with pytest.raises(RuntimeError, match="prefill first"):
        pool.decode(99, 0, q, kn, vn, 0.3)
    pool.prefill(99, 0, _rand(1, HKV, 3, D, seed=4), _rand(1, HKV, 3, D, seed=5))
    with pytest.raises(RuntimeError, match="expects 5 cached tokens, the worker holds 3"):
        pool.decode(99, 0, q, kn, vn, 0.3, cached_len=5)
    assert pool.broken is None
    assert len(pool.ping()) == 2
    pool.release(99)


def test_prefill_on_workers_async_overlap_and_callable_mode(pools):
    pool = pools(2)
    L, scale = 6, 0.25
    q, k, v = _rand(B, HQ, L, D, seed=1), _rand(B, HKV, L, D, seed=2), _rand(B, HKV, L, D, seed=3)
    mode = CallableMode("llm_compile.runtime.offload.modes:dense_step")
    out = pool.prefill(5, 0, k, v, q=q, scale=scale, is_causal=True, mode=mode)
    torch.testing.assert_close(out, dense_attention(q, k, v, None, scale, True), atol=1e-5, rtol=1e-5)
    pool.prefill(5, 1, k, v)
    refs = {s: Ref(k, v) for s in (0, 1)}
    # micro-batches A (site 0) and B (site 1) in flight together, collected in reverse order
    qa, qb = _rand(B, HQ, 1, D, seed=4), _rand(B, HQ, 1, D, seed=5)
    kn, vn = _rand(B, HKV, 1, D, seed=6), _rand(B, HKV, 1, D, seed=7)
    fa = pool.decode_async(5, 0, qa, kn, vn, scale)
    fb = pool.decode_async(5, 1, qb, kn, vn, scale)
    assert not fa.done and fa.nbytes_held() > 0
    local = torch.ones(64, 64) @ torch.ones(64, 64)  # "the other micro-batch's compute"
    torch.testing.assert_close(fb.wait(), refs[1].step(qb, kn, vn, scale), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fa.wait(), refs[0].step(qa, kn, vn, scale), atol=1e-5, rtol=1e-5)
    assert fa.done and fa.nbytes_held() == 0 and local[0, 0] == 64
    pool.release(5)


@pytest.mark.parametrize("policy, L", [("alisa", 24), ("recall", 150)])   # recall: 2 sketched blocks
def test_swa_mode_plugs_into_workers(pools, policy, L):
    from llm_compile.config import SWAConfig
    from llm_compile.runtime.swa import new_state, swa_step

    pool = pools(1)  # one worker sees all heads: equals local SWA exactly
    cfg = SWAConfig(sparsity=0.5, bucket=1, policy=policy)
    scale = D ** -0.5
    q, k, v = _rand(1, HQ, L, D, seed=1), _rand(1, HKV, L, D, seed=2), _rand(1, HKV, L, D, seed=3)
    state = new_state(1, HKV, "cpu", cfg)
    ref_out = swa_step(state, q, k, v, scale, cfg, attn_mask=None, is_causal=True)
    out = pool.prefill(3, 0, k, v, q=q, scale=scale, is_causal=True, mode=SWAMode(cfg))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    kf, vf, differs = k, v, False
    for step in range(3):
        qs, kn, vn = _rand(1, HQ, 1, D, seed=10 + step), _rand(1, HKV, 1, D, seed=20 + step), _rand(1, HKV, 1, D, seed=30 + step)
        kf, vf = torch.cat([kf, kn], -2), torch.cat([vf, vn], -2)
        expect = swa_step(state, qs, kf, vf, scale, cfg, attn_mask=None, is_causal=False)
        got = pool.decode(3, 0, qs, kn, vn, scale)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
        differs |= not torch.allclose(got, dense_attention(qs, kf, vf, None, scale, False), atol=1e-4)
    assert differs, "SWA with sparsity 0.5 should not equal dense attention"
    pool.release(3)


def test_store_only_prefills_do_not_pile_up_in_the_compute_process(pools):
    pool = pools(2)
    pool.max_inflight_bytes = 1 << 20
    k = _rand(4, HKV, 2048, D, seed=1)  # 768 KiB of K+V per prefill, 8 layers: 6 MiB if all held
    for site in range(8):
        pool.prefill(21, site, k, k)
        assert pool.local_bytes() <= pool.max_inflight_bytes + 2 * k.numel() * 4
    pool.sync()
    assert pool.local_bytes() == 0 and sum(pool.kv_bytes()) == 8 * 2 * k.numel() * 4
    pool.release(21)
    pool.max_inflight_bytes = 64 << 20


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_hung_worker_times_out(pools):
    pool = pools(1)
    pool.timeout_s = 2.0
    pool.prefill(1, 0, _rand(1, HKV, 3, D, seed=1), _rand(1, HKV, 3, D, seed=2))
    pid = pool.worker_pids()[0]
    os.kill(pid, signal.SIGSTOP)  # alive but not answering
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 did not answer within 2.0s"):
        pool.decode(1, 0, _rand(1, HQ, 1, D, seed=3), _rand(1, HKV, 1, D, seed=4), _rand(1, HKV, 1, D, seed=5), 0.3)
    assert time.monotonic() - t0 < 2.0 + 3.0  # including stopping the workers
    assert _gone(pid)  # stopped at the fault, before any shutdown()
    with pytest.raises(RuntimeError, match="broken"):
        pool.kv_bytes()
    pool.shutdown()


def test_killed_worker_mid_decode_raises_fast_and_leaves_no_children(pools):
    pool = pools(2)
    pool.prefill(1, 0, _rand(B, HKV, 4, D, seed=1), _rand(B, HKV, 4, D, seed=2))
    victim, other = pool.worker_pids()
    os.kill(victim, signal.SIGSTOP)  # freeze it so the request is surely in flight when it dies
    fut = pool.decode_async(1, 0, _rand(B, HQ, 1, D, seed=3), _rand(B, HKV, 1, D, seed=4), _rand(B, HKV, 1, D, seed=5), 0.3)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"attention worker rank 1 died \(pid \d+, exit code -9\)"):
        fut.wait()
    assert time.monotonic() - t0 < TIMEOUT_S / 2
    with pytest.raises(RuntimeError, match="broken"):
        pool.decode(1, 0, _rand(B, HQ, 1, D, seed=3), _rand(B, HKV, 1, D, seed=4), _rand(B, HKV, 1, D, seed=5), 0.3)
    deadline = time.monotonic() + 10.0  # the fault watcher stops the other worker (bounded, not instant
    while not _gone(other) and time.monotonic() < deadline:  # on a loaded machine)
        time.sleep(0.05)
    assert _gone(other)  # the first fault stopped every worker
    t0 = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - t0 < 5.0
    assert _gone(victim) and _gone(other)
    assert not [c for c in torch.multiprocessing.active_children() if c.pid in (victim, other)]
