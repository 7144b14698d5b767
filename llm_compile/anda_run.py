"""One run of the Anda precision search on an evaluator: the W4A16 reference, the acceptance rules
(whole split, per part of the calibration tokens, the held-out stopping check; the rules are
described in :mod:`llm_compile.anda_cli`, whose options choose them) and a progress bar around
:func:`llm_compile.anda_search.adaptive_precision_search`.
"""
from __future__ import annotations

from llm_compile import anda_widths
from llm_compile.anda_eval import Evaluator

__all__ = ["run_search", "part_scores"]


def run_search(evaluator: Evaluator, macs, delta: float, *, start=11, max_evals: int = 32,
               min_bits: int = 1, progress: bool = True, bands: int = 1, num_layers: int | None = None,
               holdout: Evaluator | None = None):
    """W4A16 reference + :func:`adaptive_precision_search` with a tqdm bar; returns the result, whose
    widths are over the search slots (the kinds, or ``kind@first-last`` with ``bands > 1``:
    :mod:`llm_compile.anda_bands`; :func:`llm_compile.anda_bands.to_mantissa_bits` gives the option
    value). ``macs`` are per kind over all ``num_layers`` layers (needed for bands or a per-layer
    ``start``); ``start`` is an int, a kind dict or a per-layer list. With ``evaluator.parts > 1``
    the per-part rule decides (module docstring); the result then has ``reference_parts``. With
    ``holdout`` (an evaluator on other tokens), a candidate that passes that rule is also measured there
    and accepted only if its ppl is within ``(1+delta)`` of W4A16's on those tokens (the held-out
    stopping check); the result then has ``holdout_reference`` and ``holdout_evaluations``."""
    from tqdm.auto import tqdm

    from llm_compile.anda_bands import slot_macs, slots_from, to_mantissa_bits
    from llm_compile.anda_search import adaptive_precision_search

    if num_layers is None:
        if bands != 1 or anda_widths.is_per_layer(start):
            raise ValueError("num_layers is needed for bands > 1 or a per-layer start")
        num_layers = 1
    smacs = slot_macs(macs, num_layers, bands)
    if not isinstance(start, int):
        start = slots_from(start, num_layers, bands)
    ref = evaluator.reference()
    ref_parts = evaluator.last.get("parts") if getattr(evaluator, "parts", 1) > 1 else None
    if getattr(evaluator, "parts", 1) > 1 and (not ref_parts or len(ref_parts) != evaluator.parts):
        raise ValueError(f"the W4A16 record has no {evaluator.parts} part perplexities: {ref_parts}")
    bar = tqdm(total=max_evals, desc=f"anda search d={delta:g} bands={bands}", disable=not progress,
               dynamic_ncols=True)

    def ppl(slot_widths):
        mb = to_mantissa_bits(slot_widths, num_layers, bands)
        v = evaluator(mb)
        bar.set_postfix_str(f"[{anda_widths.describe(mb)}] ppl={v:.4f}"
                            f"{' (cached)' if evaluator.last.get('cached') else ''} "
                            f"limit={(1 + delta) * ref:.4f}")
        bar.update(1)
        if ref_parts is None:
            return v
        return {"ppl": v, **part_scores(evaluator.last["parts"], ref_parts)}

    def calib_ok(entry) -> bool:
        if ref_parts:
            return all(r <= 1.0 + delta for r in entry["part_ratio"])
        return entry["ppl"] <= (1.0 + delta) * ref

    href = holdout.reference() if holdout is not None else None
    held = [0]

    def accept(entry) -> bool:
        if not calib_ok(entry):
            return False
        if holdout is None:
            return True
        v = holdout(to_mantissa_bits(entry["widths"], num_layers, bands))
        held[0] += 1
        entry["holdout_ppl"], entry["holdout_ratio"] = float(v), float(v) / href
        return v <= (1.0 + delta) * href       # NaN: rejected

    try:
        res = adaptive_precision_search(ppl, ref, smacs, delta=delta, start=start, max_evals=max_evals,
                                        min_bits=min_bits,
                                        accept=accept if (ref_parts or holdout is not None) else None)
    finally:
        bar.close()
    res.reference_parts = ref_parts
    res.holdout_reference, res.holdout_evaluations = href, held[0]
    return res


def part_scores(part_ppl, ref_parts) -> dict:
    """``{"part_ppl", "part_ratio", "worst_part_ratio"}`` of a candidate's part perplexities against
    W4A16's (a NaN ratio is the worst)."""
    ratios = [float(p) / float(r) for p, r in zip(part_ppl, ref_parts, strict=True)]
    worst = float("nan") if any(x != x for x in ratios) else max(ratios)
    return {"part_ppl": [float(p) for p in part_ppl], "part_ratio": ratios, "worst_part_ratio": worst}
