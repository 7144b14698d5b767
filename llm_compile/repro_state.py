"""Per-sequence state for the dump's ``repro.py``: a graph rewritten by ``swa``/``kv_store`` reads
its KV and SWA scores from the cache tensors it receives, so random inputs are not enough; one
rewritten by ``offload`` also names its worker pool (and the workers' SWA config) by a runtime
handle: ``repro.py`` starts a pool of the same configuration under that handle, gives every
sequence the graph reads a prefill on the workers, and shuts the pool down at the end.

At dump time :func:`state_spec` lists, per stateful site whose cache is a graph input, what the
site needs (which inputs, the op's configuration: all plain arguments of the op). ``repro.py``
then calls :func:`run_repro`, which loads the inputs, builds that state by running each op's own
prefill form on the loaded cache contents (so nothing from the compiling process is needed),
and runs the graph eagerly and then through Inductor (with fresh state each time)::

    SPEC = [{"op": "stored_attention", "k": 3, "v": 4, "q_heads": 4, "site": 0, "scale": 0.25,
             "extra": [256, 1.5, ""]}]
    run_repro(Repro(), load_args, SPEC)
"""
from __future__ import annotations

import torch
import torch.fx

import llm_compile.runtime.kv.store  # noqa: F401  (registers the stateful ops' implementations)
import llm_compile.runtime.swa  # noqa: F401

STATEFUL = ("stored_attention", "swa_attention", "static_swa_attention", "offload_attention",
            "offload_sequence")


def _handle_specs(a: dict) -> dict:
    """The configurations behind an offload op's baked handles (looked up in the compiling process)."""
    import dataclasses
    import json

    from llm_compile.runtime.context import lookup_handle

    out = {"pool": a["pool_handle"],
           "pool_cfg": json.dumps(dataclasses.asdict(lookup_handle(a["pool_handle"]).cfg))}
    h = a.get("swa_handle") or 0
    out["swa_handle"] = h
    out["swa_cfg"] = json.dumps(dataclasses.asdict(lookup_handle(h))) if h else ""
    return out


def state_spec(gm: torch.fx.GraphModule) -> list[dict]:
    """What each stateful site of ``gm`` needs from its cache inputs (placeholder indices)."""
    index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    spec = []
    for node in gm.graph.nodes:
        name = getattr(node.target, "_opname", None) if node.op == "call_function" else None
        if getattr(node.target, "namespace", None) != "llmaccel" or name not in STATEFUL:
            continue
        schema = [a.name for a in node.target._schema.arguments]
        a = dict(zip(schema, node.args))
        a.update(node.kwargs)
        q = a.get("q")
        q_heads = q.meta["val"].shape[1] if q is not None and "val" in q.meta else None
        if name == "offload_sequence":
            spec.append({"op": name, **_handle_specs({**a, "swa_handle": 0})})
            continue
        if name == "offload_attention":
            if a.get("k_cache") in index and a.get("v_cache") in index:
                spec.append({"op": name, "k": index[a["k_cache"]], "v": index[a["v_cache"]],
                             "q_heads": q_heads, "site": a["site"], "scale": a["scale"],
                             **_handle_specs(a)})
            else:
                spec.append({"op": name, "k": None, "v": None, **_handle_specs(a)})
            continue
        if name == "static_swa_attention":
            anchor, pos = a["anchor"], a["cache_position"]
            if anchor in index:
                spec.append({"op": name, "anchor": index[anchor], "k_buf": index.get(a["k_buf"]),
                             "q_heads": q_heads, "site": a["site"], "scale": a["scale"],
                             "new": int(pos.meta["val"].shape[0]) if "val" in pos.meta else 1,
                             "swa": a["swa"]})
            continue
        if a.get("k_cache") in index and a.get("v_cache") in index:
            extra = ([a["reserve"], a["growth"], a["swa"], a.get("tiers", "")] if name == "stored_attention" else [a["swa"]])
            spec.append({"op": name, "k": index[a["k_cache"]], "v": index[a["v_cache"]],
                         "q_heads": q_heads, "site": a["site"], "scale": a["scale"], "extra": extra})
    return spec


def build_state(args: list, spec: list[dict]) -> list:
    """Replace the cache inputs named by ``spec`` with tensors that carry a state built by the
    op's prefill form over their contents (random KV of the right shape); returns ``args``."""
    g = torch.Generator().manual_seed(0)
    _bind_handles(spec)
    seqs: dict = {}
    for s in spec:
        op = getattr(torch.ops.llmaccel, s["op"])
        if s["op"] == "offload_sequence" or (s["op"] == "offload_attention" and s["k"] is None):
            continue  # a prefill graph: it starts its own sequence
        if s["op"] == "offload_attention":
            _offload_state(args, s, g, seqs)
            continue
        if s["op"] == "static_swa_attention":
            _static_state(args, s, op, g)
            continue
        k, v = args[s["k"]], args[s["v"]]
        B, H, L, D = k.shape
        kr = torch.randn(B, H, L, D, generator=g).to(k.dtype)
        vr = torch.randn(B, H, L, v.shape[-1], generator=g).to(v.dtype)
        q = torch.randn(B, s["q_heads"] or H, L, D, generator=g).to(k.dtype)
        _, kc, vc = op(q, kr, vr, None, None, None, s["scale"], True, s["site"], *s["extra"])
        args[s["k"]], args[s["v"]] = kc, vc
    return args


def _static_state(args, s, op, g) -> None:
    """A StaticCache layer filled up to half its buffer: the anchor (cumulative_length) says so,
    and the SWA state is seeded by a prefill over those rows."""
    anchor, buf = args[s["anchor"]], args[s["k_buf"]] if s["k_buf"] is not None else None
    max_len = buf.shape[2] if buf is not None else 2 * s["new"] + 2
    filled = max(1, (max_len - s["new"]) // 2)
    anchor.fill_(filled)
    if buf is None:
        return
    B, H, _, D = buf.shape
    kb = torch.randn(B, H, max_len, D, generator=g).to(buf.dtype)
    q = torch.randn(B, s["q_heads"] or H, filled, D, generator=g).to(buf.dtype)
    op(q, kb, kb, torch.arange(filled), anchor, buf, None, s["scale"], True, s["site"], s["swa"])


def _bind_handles(spec: list[dict]) -> None:
    """Start (or reuse) a worker pool per offload configuration of ``spec`` and bind it, and the
    workers' SWA configs, to the handle numbers the graph has baked in."""
    import json

    from llm_compile.config import OffloadConfig, SWAConfig
    from llm_compile.runtime.context import register_handle_at
    from llm_compile.runtime.offload.shared import get_pool

    for s in spec:
        if "pool" not in s:
            continue
        register_handle_at(s["pool"], get_pool(OffloadConfig(**json.loads(s["pool_cfg"]))))
        if s.get("swa_handle"):
            register_handle_at(s["swa_handle"], SWAConfig(**json.loads(s["swa_cfg"])))


def _offload_state(args, s, g, seqs: dict) -> None:
    """A decode graph's offloaded cache: one sequence per cache (all sites of a graph share it),
    each site prefilled on the workers with random KV of the cache's shape; the inputs become the
    sequence's phantoms."""
    k, v = args[s["k"]], args[s["v"]]
    B, H, L, D = k.shape
    key = (s["pool"], B)
    if key not in seqs:
        seqs[key] = torch.ops.llmaccel.offload_sequence(k.new_empty(B, H, 1, D), s["pool"])
    seq = seqs[key]
    kr = torch.randn(B, H, L, D, generator=g).to(k.dtype)
    vr = torch.randn(B, H, L, v.shape[-1], generator=g).to(v.dtype)
    q = torch.randn(B, s["q_heads"] or H, L, D, generator=g).to(k.dtype)
    torch.ops.llmaccel.offload_attention(q, kr, vr, None, None, None, s["scale"], True, s["site"],
                                         s["pool"], s["swa_handle"], seq)
    args[s["k"]] = torch.ops.llmaccel.kv_phantom(None, kr, seq)
    args[s["v"]] = torch.ops.llmaccel.kv_phantom(None, vr, seq)


def run_repro(mod: torch.nn.Module, load_args, spec: list[dict], inductor: bool = True):
    """Load the inputs, build their state, run ``mod`` eagerly and (fresh state) through
    Inductor's ``compile_fx_inner``; returns the eager outputs."""
    from torch._dynamo.debug_utils import InputReader

    def fresh() -> list:
        reader = InputReader()
        load_args(reader)
        return build_state(list(reader.args), spec)

    try:
        with torch.no_grad():
            out = mod(*fresh())
            if inductor:
                from torch._inductor.compile_fx import compile_fx_inner
                from torch.fx.experimental.proxy_tensor import make_fx

                args = fresh()
                gm = make_fx(mod, tracing_mode="fake")(*args)
                compile_fx_inner(gm, args)(list(fresh()))
    finally:
        if any("pool" in s for s in spec):
            from llm_compile.runtime.offload.shared import shutdown_pools

            shutdown_pools()
    print(f"llmaccel repro: ran with {len(spec)} stateful site(s) given a fresh sequence state")
    return out
