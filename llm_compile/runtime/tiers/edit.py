"""Cache edits of tiered KV — beam search's reorder and batch selection (``map_batch``) and
``crop`` (assisted decoding) — that keep every position where it is: device rows, host rows,
the phase-3 kept rows (host tier) and the kept rows of the positions not decided yet (pending, on
the device) are edited in place, tier by tier, and the placement (``loc``, ``slot``) stays. A
rebuild from full K/V cannot do this past p2: K/V cannot give back the layer input a phase-3 token
needs, so the rebuilt cache had no kept rows and placed its tokens as phases 1-2 do (past the host
budget: ``HostTierFullError``).

``map_batch(kv, fn)``: ``fn`` gathers along the batch (``index_select``, ``repeat_interleave``,
``t[indices]``), so ``fn(arange(B))`` says which old entry each new entry comes from; every tier is
gathered by that, on its own device. A new batch size gets the plan for that batch; a placement
that does not fit it is rebuilt from full K/V when no position is in phase 3, and raises
``HostTierFullError`` otherwise (never a wrong answer). ``crop(kv, n)``: device slots of the cut
positions are freed, host and kept tiers compacted to the positions left, the pending kept rows
cut at ``n``, and ``decided`` lowered to ``n``.
"""
from __future__ import annotations

import copy

import torch


def batch_index(plan_batch: int, heads: int) -> torch.Tensor:
    """``b * H + h`` as ``[B, H, 1]`` (the flat row of a (sequence, head) within a slot)."""
    return torch.arange(plan_batch)[:, None, None] * heads + torch.arange(heads)[None, :, None]


def map_batch(kv, fn, full_error):
    """A new store whose batch is ``fn`` of ``kv``'s (see the module docstring)."""
    B, H = kv.shape[:2]
    sel = fn(torch.arange(B, device=kv.device)).reshape(-1).cpu()
    B2 = sel.numel()
    plan = kv.plan if B2 == B or kv.replan is None else kv.replan(B2)
    if B2 != B and not _fits(kv, plan):
        if kv.recompute_tokens() == 0:
            k, v = kv.full()
            return kv._rebuilt(fn(k), fn(v), None if kv.state is None else kv.state.map_batch(fn))
        raise full_error(
            f"llmaccel kv_tiers: the cache edited from batch {B} to {B2} does not fit the plan for batch {B2} "
            f"({kv.device_tokens()} device tokens of {plan.cap}, {kv.host.used} host tokens of {plan.host_cap}, "
            f"host budget {plan.host_layer_bytes} B per layer) and {kv.recompute_tokens()} positions are in "
            "phase 3 (only their layer input is kept): raise kv_tiers.device_budget / host_budget for the "
            "larger batch")
    new = copy.copy(kv)
    new.shape, new.plan = (B2, *kv.shape[1:]), plan
    new.dev = kv.dev.select_batch(sel, plan.cap)
    new.host = kv.host.select_batch(sel, plan.host_cap)
    new.rec = None if kv.rec is None else kv.rec.select_batch(sel, plan.kept_cap)
    new.pend = None if kv.pend is None else kv.pend.index_select(1, sel.to(kv.pend.device))
    new.loc, new.slot, new.free, new.checked = kv.loc.clone(), kv.slot.clone(), list(kv.free), set(kv.checked)
    new._bh = batch_index(B2, H)
    new.state = None if kv.state is None else kv.state.map_batch(fn)
    return new


def _fits(kv, plan) -> bool:
    """Whether ``kv``'s placement, at ``plan``'s batch, stays within its budgets."""
    scale = plan.row_bytes / kv.plan.row_bytes
    if kv.device_tokens() > plan.cap:
        return False
    if plan.host_cap is None:
        return True
    return kv.host.used <= plan.host_cap and kv.host_nbytes() * scale <= plan.host_layer_bytes


def crop(kv, n: int) -> None:
    """Keep the first ``n`` positions, in place (see the module docstring)."""
    n = max(0, n)
    if n >= kv.length:
        return
    loc = kv.loc[: kv.length]
    gone = loc[n:]
    dev_gone = torch.nonzero(gone == 0).flatten() + n
    kv.free.extend(kv.slot[dev_gone].tolist())
    kv.n_dev -= dev_gone.numel()
    for code, name in ((1, "host"), (2, "rec")):
        if bool((gone == code).any()):
            stay = torch.nonzero(loc[:n] == code).flatten()
            setattr(kv, name, getattr(kv, name).taken(kv.slot[stay]))
            kv.slot[stay] = torch.arange(stay.numel())
    kv.length, kv.decided = n, min(kv.decided, n)
    if kv.pend is not None:
        kv.pend = kv.pend[: n - kv.pend0].clone() if n > kv.pend0 else None
    kv.state = None if kv.state is None else kv.state.crop(n)
