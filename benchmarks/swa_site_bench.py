"""One sparse-window-attention site, decode only (no model, no prefill), for ``bench_swa.py``:

* :func:`cpu_op_bench` (CPU, seconds): dense SDPA vs ``swa_step`` over the store's in-place rows at
  ``--op-context`` tokens;
* :func:`gpu_bench` (CUDA): dense SDPA vs the SWA Triton kernel vs the torch gather path at
  ``--gpu-context`` tokens, fp16, plus the token selection's cost;
* :func:`policy_bench` (CUDA; any device in tests): whole decode steps of one site per policy
  (``swa_step``: scorer, pick, attend, score update; ``recall``: the sketch's Triton kernel) vs
  dense SDPA over the same cache, at each of ``--gpu-policy-contexts`` — issue 15's speed target
  (``recall`` at 0.8 >= 2x dense at 8k, batch 4) measured where a GPU is lent.

Both take ``bench_swa.py``'s parsed arguments.
"""
from __future__ import annotations

import time

import torch

from llm_compile.config import SWAConfig
from llm_compile.ops.attention import dense_attention
from llm_compile.runtime import swa
from llm_compile.runtime.kv.hugepages import empty_kv
from llm_compile.runtime.swa.state import SWAState, compute_budget


def cpu_op_bench(args) -> dict:
    """One attention site, decode only, at ``--op-context`` tokens (no prefill needed), the way
    ``llmaccel::stored_attention`` runs it over an ``LLMAccelCache`` site: the new row is already
    in a preallocated ``[B, Hkv, capacity, D]`` buffer and both paths read the filled rows in
    place — dense (``dense_attention``: SDPA over every row) vs ``swa_step`` (trim, select,
    attend over the kept rows with the C kernel, score update). The SWA state starts with random
    scores; the two paths run interleaved step by step."""
    B, Hq, Hkv, D, n0, steps = args.batch, 9, 3, 64, args.op_context, args.steps
    g = torch.Generator().manual_seed(0)
    cap = n0 + steps + 64
    kc, vc = (empty_kv((B, Hkv, cap, D), torch.float32, "cpu").copy_(torch.randn(B, Hkv, cap, D, generator=g))
              for _ in range(2))   # allocated as LLMAccelCache's buffers are (huge pages)
    qs = torch.randn(steps, B, Hq, 1, D, generator=g)
    cfg = SWAConfig(sparsity=args.sparsity, bucket=args.bucket, kernel="torch", policy=args.policy)
    st = swa.new_state(B, Hkv, "cpu", cfg)
    st.grow(n0)
    st.score[:] = torch.randint(0, 1 << 30, (B, 1, n0), generator=g)
    times = {"dense": [], "swa": []}
    for i in range(steps):
        n = n0 + i + 1
        t0 = time.perf_counter()
        dense_attention(qs[i], kc[:, :, :n], vc[:, :, :n], None, D ** -0.5, False)
        times["dense"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        swa.swa_step(st, qs[i], kc[:, :, :n], vc[:, :, :n], D ** -0.5, cfg)
        times["swa"].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    b = compute_budget(n0 + steps, cfg)
    row = 2 * Hkv * D * 4 * B
    return {"context": n0, "batch": B, "policy": args.policy, "budget": b.describe(), "dense_ms": med["dense"],
            "swa_ms": med["swa"], "speedup": med["dense"] / med["swa"],
            "kv_bytes": {"dense": n0 * row, "swa_padded": b.padded * row}}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def policy_bench(args, device: str = "cuda", dtype: torch.dtype = torch.float16) -> dict:
    """One attention site, decode only, per policy of ``--gpu-policies`` at sparsity
    ``--sparsity``, against dense SDPA over the same rows, at each context of
    ``--gpu-policy-contexts``: ``--gpu-steps`` steps, the cache growing by one row per step (as in
    :func:`cpu_op_bench`; the state starts with random history scores, a policy with a key sketch
    builds it on its first step, untimed), each step timed whole (launches and host work
    included, synchronized), median. A policy that fails is reported with its error, not hidden."""
    B, Hq, Hkv, D = args.batch, 9, 3, 64
    steps, warm = args.gpu_steps, 2
    scale = D ** -0.5
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for n0 in args.gpu_policy_contexts:
        cap = n0 + steps + warm + 1
        k = torch.randn(B, Hkv, cap, D, generator=g).to(device, dtype)
        v = torch.randn(B, Hkv, cap, D, generator=g).to(device, dtype)
        qs = torch.randn(steps + warm, B, Hq, 1, D, generator=g).to(device, dtype)
        row = {"context": n0, "batch": B, "dtype": str(dtype).replace("torch.", ""), "ms": {}, "errors": {}}
        for name in ["dense", *args.gpu_policies]:
            try:
                if name != "dense":
                    cfg = SWAConfig(sparsity=args.sparsity, bucket=args.bucket, policy=name)
                    st = swa.new_state(B, Hkv, device, cfg)
                    st.grow(n0)
                    st.score[:] = torch.randint(0, 1 << 30, (B, 1, n0), generator=g).to(device)
                    row.setdefault("budget", {})[name] = compute_budget(n0 + steps + warm, cfg).describe()
                times = []
                for i in range(steps + warm):
                    n = n0 + i + 1
                    _sync(device)
                    t0 = time.perf_counter()
                    if name == "dense":
                        torch.nn.functional.scaled_dot_product_attention(
                            qs[i], k[:, :, :n], v[:, :, :n], scale=scale, enable_gqa=True)
                    else:
                        swa.swa_step(st, qs[i], k[:, :, :n], v[:, :, :n], scale, cfg)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                times = sorted(times[warm:])
                row["ms"][name] = times[len(times) // 2] * 1e3
            except Exception as e:  # noqa: BLE001 - one policy's failure is a result of the check
                row["errors"][name] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    return {"device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else device,
            "sparsity": args.sparsity, "steps": steps, "rows": rows}


def print_policy_bench(r: dict) -> None:
    print(f"\nOne decode site per policy, {r['device']}, sparsity {r['sparsity']}, median of {r['steps']} "
          "steps (ms; x = speed vs dense SDPA)")
    for row in r["rows"]:
        dense = row["ms"].get("dense")
        cells = [f"{p} {ms:.3f}" + (f" ({dense / ms:.2f}x)" if dense and p != "dense" else "")
                 for p, ms in row["ms"].items()]
        print(f"  context {row['context']}, batch {row['batch']}, {row['dtype']}: " + ", ".join(cells))
        for p, e in row["errors"].items():
            print(f"  context {row['context']}: {p} FAILED: {e}")


def _cuda_ms(fn, reps=50) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median"))


def gpu_bench(args) -> dict:
    from llm_compile.codegen.swa_kernels import swa_decode_attention

    dev, dt, B, Hq, Hkv, D, n = "cuda", torch.float16, args.batch, 9, 3, 64, args.gpu_context
    torch.manual_seed(0)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    k = torch.randn(B, Hkv, n, D, device=dev, dtype=dt)
    v = torch.randn(B, Hkv, n, D, device=dev, dtype=dt)
    cfg = SWAConfig(sparsity=args.sparsity, bucket=args.bucket)
    b = compute_budget(n, cfg)
    st = SWAState(B, 1, dev)
    st.grow(n)
    st.score[:] = torch.randint(0, 1 << 30, (B, 1, n), device=dev)
    idx = st.select(b)
    bias = torch.zeros(B, 1, b.padded, device=dev)
    bias[..., b.total:] = float("-inf")
    scale = D ** -0.5
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, scale=scale, enable_gqa=True)
    tri = lambda: swa_decode_attention(q[:, :, 0], k, v, idx, bias, scale)  # noqa: E731
    tor = lambda: swa.gather_attend_torch(q[:, :, 0], k, v, idx, bias, scale)  # noqa: E731
    o_t, w_t = tri()
    o_r, w_r = tor()
    err = float((o_t.float() - o_r.float()).abs().max())
    kv_row = 2 * Hkv * D * 2 * B
    return {"device": torch.cuda.get_device_name(), "context": n, "batch": B, "dtype": "fp16",
            "budget": b.describe(), "dense_sdpa_ms": _cuda_ms(dense), "swa_triton_ms": _cuda_ms(tri),
            "swa_torch_gather_ms": _cuda_ms(tor), "select_topk_ms": _cuda_ms(lambda: st.select(b)),
            "max_abs_err_triton_vs_torch": err,
            "kv_bytes": {"dense": n * kv_row, "swa_padded": b.padded * kv_row}}
