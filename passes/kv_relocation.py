"""KV relocation: move every attention site's KV cache out of the model's cache tensors.

Shared by ``local_kv_store`` (the KV goes to in-place buffers owned by the cache object) and
``attention_offload`` (the KV goes to attention workers). Each canonical site
(``llmaccel::attention`` or ``llmaccel::swa_attention``) is replaced by a call the pass builds, and
every cache tensor the graph *returns* for that site (the new K/V at prefill, the
``cat([past, new], -2)`` at decode, or ``swa_attention``'s own cache outputs) becomes a zero-memory
phantom: either one the new call returns (``stored_attention``: the phantoms carry the KV) or
``llmaccel::kv_phantom(past, new)`` (offload)::

    before:  attention = llmaccel.attention(q, k, v, past_k, past_v, ..., cat, cat_1)
             return (cat_1, cat, ..., logits)
    after:   stored = llmaccel.stored_attention(q, k, v, past_k, past_v, ..., 256, 1.5, '', '')
             out, k_ph, v_ph = stored[0], stored[1], stored[2]
             return (v_ph, k_ph, ..., logits)

All or nothing: a site whose cache append feeds anything but the returned cache cannot move (its
KV would have to stay in the model too), and a phantom cache input whose *values* something still
reads after the rewrite would be read as zeros; either way :class:`RelocationIncomplete` is raised
and the pass manager rolls the whole pass back.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

import llm_compile.ops  # noqa: F401  (declares the llmaccel:: ops)
from llm_compile.passes.attention_patterns import call_args, getitem_of, is_cache_append

aten = torch.ops.aten
PHANTOM = torch.ops.llmaccel.kv_phantom.default
SITE_TARGETS = (torch.ops.llmaccel.attention.default, torch.ops.llmaccel.swa_attention.default)
STATIC_TARGETS = (torch.ops.llmaccel.static_attention.default,
                  torch.ops.llmaccel.static_swa_attention.default)
_SIZE_QUERIES = {aten.sym_size.int, aten.sym_size.default, aten.sym_stride.int,
                 aten.sym_numel.default, aten.sym_storage_offset.default}
READS_PHANTOMS_BY_LENGTH = {torch.ops.llmaccel.offload_attention.default,
                            torch.ops.llmaccel.stored_attention.default, PHANTOM}
"""Ops that only read a phantom cache's length (ops may also set ``llmaccel_reads_phantoms_by_length``)."""


class RelocationIncomplete(RuntimeError):
    """Some site's KV cannot move: the pass raises it so that the manager rolls the whole pass
    back (all KV stays in the model) instead of leaving a mixed graph."""


def cache_outputs(out_node: torch.fx.Node, site: torch.fx.Node, past, new, index: int) -> list[int]:
    """Indices of the graph outputs that are this site's cache after the call: ``new`` itself
    (prefill), ``cat([past, new], -2)`` (decode), or output ``index`` (1 = K, 2 = V) of a
    multi-output site (``swa_attention``)."""
    outs = out_node.args[0]
    return [i for i, o in enumerate(outs)
            if (past is None and o is new) or (past is not None and is_cache_append(o, past, new))
            or getitem_of(o, site, index)]


def is_phantom_val(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return False
    # literal 0 strides only: comparing a symbolic stride would add a guard
    return all(type(st) is int and st == 0 for st in val.stride())


def fake_call(fn, *vals):
    """``fn(*vals)`` under the fake mode of ``vals`` (None without one)."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([v for v in vals if v is not None])
    if mode is None:
        return None
    with mode:
        return fn(*vals)


def _phantom_consumer_ok(node: torch.fx.Node) -> bool:
    return node.op == "output" or (node.op == "call_function" and (
        node.target in _SIZE_QUERIES or node.target in READS_PHANTOMS_BY_LENGTH
        or getattr(node.target, "llmaccel_reads_phantoms_by_length", False)))


def check_phantom_inputs(g: torch.fx.Graph) -> list[str]:
    """Nodes that read the *values* of a phantom cache input (anything but the ops that read
    phantoms by length, size queries and the graph output); there must be none."""
    bad = []
    for ph in g.nodes:
        if ph.op == "placeholder" and is_phantom_val(ph):
            bad += [f"{u.name} ({u.target}) reads phantom input {ph.name}" for u in ph.users
                    if not _phantom_consumer_ok(u)]
    return bad


def _busy_sites(sites, out_node, outs) -> list[dict]:
    bad = []
    for node in sites:
        a = call_args(node)
        if outs is None or a["k_cache"] is None:
            continue
        idx = (cache_outputs(out_node, node, a["k_cache"], a["k"], 1)
               + cache_outputs(out_node, node, a["v_cache"], a["v"], 2))
        busy = [outs[i].name for i in idx
                if outs[i].op != "call_function" or outs[i].target is not operator.getitem
                if set(outs[i].users) - {out_node, node}]
        if busy:
            why = f"cache append {busy} has users besides the graph output"
            if is_phantom_val(a["k_cache"]):
                why += " (and its cache is a phantom: local attention would read zeros)"
            bad.append({"node": node.name, "site": a["site"], "reason": why})
    return bad


def _returned(node, out_node, outs) -> int:
    a = call_args(node)
    if outs is None:
        return 0
    return len(cache_outputs(out_node, node, a["k_cache"], a["k"], 1)
               + cache_outputs(out_node, node, a["v_cache"], a["v"], 2))


def relocate_kv(gm: torch.fx.GraphModule, build, what: str, require_returned_cache: bool = False,
                refuse_static: str | None = None) -> list[dict]:
    """Replace every canonical site by ``build(graph, node, args) -> (out, k_cache, v_cache)``
    (nodes inserted before ``node``; ``k_cache``/``v_cache`` None: a ``kv_phantom`` is made) and
    the cache tensors the graph returns by phantoms, or raise :class:`RelocationIncomplete`.

    With ``require_returned_cache``, a site whose cache is not returned is refused too, and a
    graph where no site returns its cache (``use_cache=False``) is left as it is (``[]``).
    ``refuse_static``: the reason to raise if the graph has HF ``StaticCache`` sites."""
    g = gm.graph
    sites = [n for n in g.nodes if n.op == "call_function" and n.target in SITE_TARGETS]
    static = [n for n in g.nodes if n.op == "call_function" and n.target in STATIC_TARGETS]
    if static and refuse_static:
        raise RelocationIncomplete(f"llmaccel {what}: {len(static)} attention site(s) read a "
                                   f"preallocated StaticCache: {refuse_static}")
    out_node = next(n for n in reversed(g.nodes) if n.op == "output")
    outs = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else None
    if not sites:
        bad = check_phantom_inputs(g)
        if bad:
            raise RelocationIncomplete(f"llmaccel {what}: no attention site to rewrite, but {'; '.join(bad)}")
        return []
    bad = _busy_sites(sites, out_node, outs)
    if require_returned_cache:
        missing = [{"node": n.name, "site": call_args(n)["site"],
                    "reason": "the graph does not return its K/V cache (the model keeps no cache here)"}
                   for n in sites if _returned(n, out_node, outs) < 2]
        if len(missing) == len(sites):
            return []  # the graph keeps no cache at all (use_cache=False): nothing to move
        bad += missing
    if bad:
        raise RelocationIncomplete(
            f"llmaccel {what}: {len(bad)} of {len(sites)} attention site(s) cannot be "
            f"{'offloaded' if what == 'offload' else 'moved to the ' + what}, so none is (no mixed graph): "
            + "; ".join(f"site {b['site']} ({b['node']}): {b['reason']}" for b in bad))
    matched = [_relocate_site(g, node, out_node, build) for node in sites]
    g.eliminate_dead_code()
    bad = check_phantom_inputs(g)
    if bad:
        raise RelocationIncomplete(f"llmaccel {what}: after the rewrite, " + "; ".join(bad))
    return matched


def _relocate_site(g: torch.fx.Graph, node: torch.fx.Node, out_node: torch.fx.Node, build) -> dict:
    a = call_args(node)
    outs = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else None
    k_idx = v_idx = []
    if outs is not None:
        k_idx = cache_outputs(out_node, node, a["k_cache"], a["k"], 1)
        v_idx = cache_outputs(out_node, node, a["v_cache"], a["v"], 2)
    with g.inserting_before(node):
        out, k_ph, v_ph = build(g, node, a)
    if node.target is torch.ops.llmaccel.swa_attention.default:  # multi-output: (out, k, v)
        for u in list(node.users):
            if getitem_of(u, node, 0):
                u.replace_all_uses_with(out)
    else:
        node.replace_all_uses_with(out)
    for idx, ph, past, fresh in ((k_idx, k_ph, a["k_cache"], a["k"]), (v_idx, v_ph, a["v_cache"], a["v"])):
        if not idx:
            continue
        if ph is None:
            with g.inserting_before(out_node):
                ph = g.call_function(PHANTOM, (past, fresh))
            val = fake_call(PHANTOM, past.meta.get("val") if past is not None else None, fresh.meta.get("val"))
            if val is not None:
                ph.meta["val"] = val
        outs = list(out_node.args[0])
        for i in idx:
            outs[i] = ph
        out_node.args = (tuple(outs),) + tuple(out_node.args[1:])
    for u in list(node.users):  # swa_attention's cache getitems, now unused
        if not u.users:
            g.erase_node(u)
    g.erase_node(node)
    return {"site": a["site"], "node": out.name, "form": "swa" if a.get("swa") else "dense",
            "decode": a["k_cache"] is not None, "cache_outputs_phantomized": len(k_idx) + len(v_idx)}
