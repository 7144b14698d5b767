"""Anda adaptive precision search on SmolLM2-135M-Instruct: evaluators, evaluation cache, CLI.

    python -m llm_compile.anda_cli --delta 0.01 --out anda_tuple.json
    python -m llm_compile.anda_cli --delta 0.001 --out anda_tuple_0.1.json   # reuses the cache
    python -m llm_compile.anda_cli --delta 0.01 --bands 3 --start anda_tuple.json --out bands3.json

Steps: load SmolLM2-135M-Instruct with INT4 weights in every linear but ``lm_head``: by default the
shipped GGUF file's own Q4_1 integers (``--weights gguf``, :func:`llm_compile.load_quantized`:
the W4A16 reference *is* the GGUF model), or the float model re-quantized with symmetric RTN
(``--weights requant``, :func:`llm_compile.quantize.quantize_weights`, group 64 by default because
SmolLM2's hidden size 576 is not a multiple of 128); measure the W4A16 reference
perplexity (the quantized model, eager, float activations) on the *calibration* split, run
:func:`llm_compile.anda_search.adaptive_precision_search` at ``--delta`` and write the chosen tuple as
``{"mantissa_bits": {...}}``, which ``options={"anda": json.load(f)}`` accepts as is.

Layer bands (``--bands N``): the decoder layers are split into N contiguous bands and the search
gets one width per (module kind, band) (:mod:`llm_compile.anda_bands`); N = 1 is the per-kind tuple,
N = the number of layers a per-layer search. The output is then a per-layer list
(``{"mantissa_bits": [{...}, ... one per layer]}``, :mod:`llm_compile.anda_widths`), which the
backend takes as is. With 4N slots a search from M = 11 needs many more evaluations than the cap
allows, so ``--start`` takes an earlier search's output (a warm start: ``--start
gguf_b1_d1.json``); the summary counts the evaluations of both (``total_evaluations``).

Evaluators (``--evaluator``). All run every quantized linear as ``llmaccel::anda_linear`` with
``kernel="reference"``: pure torch (fake-quantize the activations to Anda, dequantize the weights,
FP32 matmul), the same math as the generated Triton kernels, and fast on CPU where the kernels
would run in the Triton interpreter.

* ``eager`` (default): each ``QuantLinear`` of the eager model calls the op with the width of its
  kind (kinds from :func:`llm_compile.passes.anda_lowering.module_kind`, as the pass assigns them).
  No compile: ~15-60 s per candidate for 512 tokens on two shared cores, so one delta (<= 32
  evaluations) fits in about 15 minutes. Afterwards (unless ``--no-verify``) the chosen tuple is
  compiled with the backend once, and its lowered-linear count and perplexity are printed.
* ``compile``: the model compiled with ``backend="llmaccel", options={"anda": {"mantissa_bits":
  tuple, "kernel": "reference"}, "inner": "eager"}``; Dynamo traces once and the backend (AOTAutograd +
  the passes) is re-run for each candidate on that trace (:class:`RetargetBackend`), which gives
  bit-identical perplexities to ``recompile``: a fresh ``torch.compile`` per candidate. Exact, but
  1-3 minutes per candidate on two shared cores.

The eager and compiled models compute the same ops, yet not the same bits (decomposed RMSNorm,
canonical attention: ~1e-4 logit differences), and Anda's truncation turns those into different
rounding decisions downstream: at M = 7 the two perplexities differ by ~0.2% (1024 tokens).

Calibration split and per-part acceptance. ``--calib-split`` picks the split of
:mod:`llm_compile.eval.data` the search measures on: ``calibration`` (default: a prefix of Genesis,
Exodus) or ``calibration-wide`` (``--tokens / 8`` tokens from the start of each of Genesis, Exodus,
Psalms, Proverbs, Isaiah, Acts, Romans, Revelation). ``--calib-parts K`` (default 1: the whole-split
rule, ``ppl <= (1+delta) * ppl(W4A16)``) cuts the calibration tokens into K contiguous parts
(:func:`llm_compile.anda_eval.part_bounds`; with the wide split and K = 8, one part per book) and
accepts a candidate only if *every* part's perplexity is within ``(1+delta)`` of W4A16's on the same
part (which implies the whole-split rule). The reported ppl stays the whole-split value; the history
entries add ``part_ppl``, ``part_ratio`` (candidate / W4A16 per part) and ``worst_part_ratio``.

Held-out stopping check (``--holdout-tokens N``, default 0: off). Besides the calibration rule, every
candidate that passes it is also measured on ``N`` tokens of the ``holdout`` split (``N / 8`` from the
start of each of Deuteronomy, 1 Samuel, Job, Jeremiah, 1 Corinthians, Hebrews, James, 1 Peter: in
neither calibration split nor the evaluation split) and rejected (so not expanded) if its whole-split
held-out ppl exceeds ``(1+delta)`` times W4A16's there. ``--max-evals`` counts the calibration
evaluations only; the history entries add ``holdout_ppl`` and ``holdout_ratio``.

Evaluations are memoised in a JSON file (``--cache``), keyed by everything that changes a number
(model, quantization, split, tokens, context, stride, evaluator, kernel, parts when K > 1) and the
tuple, so a second ``--delta`` reuses the first one's evaluations.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Mapping

from llm_compile import anda_widths
from llm_compile.anda_eval import MODES, EvalCache, Evaluator, kind_widths, linear_kinds, part_bounds
from llm_compile.anda_run import part_scores, run_search
from llm_compile.anda_widths import ANDA_MODULE_KINDS

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_TOKENS, DEFAULT_CONTEXT, DEFAULT_GROUP = 512, 512, 64

__all__ = ["load_w4_model", "WEIGHTS", "weights_setting", "model_macs", "relative_bops", "run_search",
           "part_scores", "parse_start", "write_tuple", "CALIB_SPLITS", "positive_int", "main"]

CALIB_SPLITS = ("calibration", "calibration-wide")
"""Splits ``--calib-split`` takes (:mod:`llm_compile.eval.data`; never the evaluation split)."""


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


WEIGHTS = ("gguf", "requant")
"""W4A16 baselines: ``gguf`` = the shipped Q4_1 file's own integers (lossless, asymmetric, group 32:
the GGUF model itself); ``requant`` = the float model re-quantized with symmetric RTN (the old one)."""


def weights_setting(weights: str, group_size: int) -> str:
    """The cache-key name of a W4A16 baseline."""
    return "gguf-q4_1" if weights == "gguf" else f"int4-g{group_size}"


def load_w4_model(weights: str = "gguf", bits: int = 4, group_size: int = DEFAULT_GROUP):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct with INT4 weights in every linear but lm_head,
    either the GGUF file's own (``weights="gguf"``, via :func:`llm_compile.load_quantized`) or the
    float model re-quantized (``"requant"``: symmetric RTN, ``bits``, ``group_size``)."""
    from llm_compile.eval.model import GGUF_FILE, gguf_folder, load_smollm2
    from llm_compile.quantize import quantize_weights

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} not in {WEIGHTS}")
    model, tok = load_smollm2()
    if weights == "requant":
        return quantize_weights(model, bits=bits, group_size=group_size), tok
    from llm_compile.checkpoints import load_quantized

    return load_quantized(os.path.join(gguf_folder(), GGUF_FILE)), tok


def model_macs(model) -> dict[str, int]:
    """MACs per token of each Anda kind, over all layers (from the model config)."""
    from llm_compile.anda_search import macs_per_token

    c = model.config
    return macs_per_token(c.hidden_size, c.intermediate_size, c.num_attention_heads,
                          c.num_key_value_heads, getattr(c, "head_dim", None), c.num_hidden_layers)


def relative_bops(widths, macs: Mapping[str, float]) -> float:
    """BOPs of ``widths`` (int, kind dict or per-layer list; ``macs`` per kind over all layers, layers
    alike) over BOPs of FP16 activations (M = 16) with the same INT4 weights."""
    w = kind_widths(widths)
    layers = w if isinstance(w, list) else [w]
    num = sum(macs[k] * e[k] for e in layers for k in ANDA_MODULE_KINDS) / len(layers)
    return num / (16 * sum(macs[k] for k in ANDA_MODULE_KINDS))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llm_compile.anda_cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta", type=float, default=0.01, help="tolerance: ppl <= (1+delta)*ppl(W4A16)")
    ap.add_argument("--out", default="anda_tuple.json", help="chosen tuple, for options={'anda': ...}")
    ap.add_argument("--cache", default="anda_search_cache.json", help="evaluation memo ('' = none)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens")
    ap.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="perplexity window")
    ap.add_argument("--stride", type=int, default=None, help="window stride (default: context)")
    ap.add_argument("--weights", choices=WEIGHTS, default="gguf",
                    help="W4A16 baseline: the GGUF file's own Q4_1 integers (default) or 'requant' "
                         "(float model re-quantized, symmetric RTN, --group-size)")
    ap.add_argument("--group-size", type=int, default=DEFAULT_GROUP, help="INT4 weight group (requant)")
    ap.add_argument("--bands", type=int, default=1,
                    help="layer bands: one width per (module kind, band of contiguous layers); 1 = per "
                         "kind (the paper's tuple), the number of layers = per layer. With > 1 the "
                         "output is a per-layer list")
    ap.add_argument("--start", default="11",
                    help="start widths: an int for every slot, 'qkv,o,gate_up,down', or a JSON file "
                         "({'mantissa_bits': ...}, e.g. an earlier search's --out: a warm start)")
    ap.add_argument("--calib-split", choices=CALIB_SPLITS, default="calibration",
                    help="calibration split: 'calibration' (Genesis, Exodus prefix; default) or "
                         "'calibration-wide' (tokens/8 from the start of each of 8 books)")
    ap.add_argument("--calib-parts", type=positive_int, default=1, metavar="K",
                    help="accept a candidate only if each of K contiguous parts of the calibration "
                         "tokens is within (1+delta) of W4A16 on that part (default 1: whole split; "
                         "with calibration-wide, 8 = one part per book)")
    ap.add_argument("--holdout-tokens", type=int, default=0, metavar="N",
                    help="held-out stopping check: also reject a candidate whose ppl on N tokens of the "
                         "'holdout' split (N/8 from each of its 8 books) exceeds (1+delta) of W4A16's "
                         "there (default 0: off)")
    ap.add_argument("--min-bits", type=int, default=1)
    ap.add_argument("--max-evals", type=int, default=32, help="evaluation cap (Anda: 32)")
    ap.add_argument("--evaluator", choices=MODES, default="eager",
                    help="eager (default: fast), compile (exact backend graphs, 1-3 min per candidate "
                         "on 2 shared cores), recompile (a fresh torch.compile per candidate)")
    ap.add_argument("--no-verify", action="store_true",
                    help="after an eager search, do not compile the chosen tuple with the backend")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def parse_start(text: str):
    """``--start``: an int, ``"qkv,o,gate_up,down"`` or a JSON file -> ``(value, file summary)``; the
    summary is the file's ``.search.json`` (its evaluations count toward a warm start) or ``None``."""
    if text.strip().isdigit():
        return int(text), None
    parts = text.split(",")
    if len(parts) == len(ANDA_MODULE_KINDS) and all(p.strip().isdigit() for p in parts):
        return dict(zip(ANDA_MODULE_KINDS, map(int, parts))), None
    with open(text) as f:
        data = json.load(f)
    value = data["mantissa_bits"] if isinstance(data, Mapping) and "mantissa_bits" in data else data
    summary = Path(text).with_suffix(".search.json")
    return anda_widths.normalise(value), (json.loads(summary.read_text()) if summary.is_file() else None)


def write_tuple(path, mantissa_bits) -> None:
    """``{"mantissa_bits": ...}`` with one line per layer for a per-layer list."""
    if anda_widths.is_per_layer(mantissa_bits):
        body = ",\n  ".join(json.dumps(e) for e in mantissa_bits)
        text = '{"mantissa_bits": [\n  ' + body + "\n]}\n"
    else:
        text = json.dumps({"mantissa_bits": mantissa_bits}, indent=1) + "\n"
    Path(path).write_text(text)


def main(argv=None) -> dict:
    from llm_compile.anda_bands import band_ranges, to_mantissa_bits

    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    from llm_compile.eval.data import load_tokens

    try:
        part_bounds(args.tokens, args.calib_parts)    # checks --calib-parts before loading anything
    except ValueError as e:
        ap.error(f"--calib-parts: {e}")
    if args.holdout_tokens < 0:
        ap.error("--holdout-tokens: expected an integer >= 0")
    start, start_summary = parse_start(args.start)
    model, tok = load_w4_model(args.weights, 4, args.group_size)
    num_layers = model.config.num_hidden_layers
    band_ranges(num_layers, args.bands)           # checks --bands before any evaluation
    ids = load_tokens(tok, args.calib_split, args.tokens)
    setting = {"model": MODEL_NAME, "weights": weights_setting(args.weights, args.group_size),
               "split": args.calib_split}
    ev = Evaluator(model, ids, context=args.context, stride=args.stride, mode=args.evaluator,
                   cache=EvalCache(args.cache or None), setting=setting, progress=False,
                   parts=args.calib_parts)
    hv = None
    if args.holdout_tokens:
        hv = Evaluator(model, load_tokens(tok, "holdout", args.holdout_tokens), context=args.context,
                       stride=args.stride, mode=args.evaluator, cache=ev.cache,
                       setting=dict(setting, split="holdout"), progress=False)
    macs = model_macs(model)
    res = run_search(ev, macs, args.delta, start=start, max_evals=args.max_evals,
                     min_bits=args.min_bits, progress=not args.quiet, bands=args.bands,
                     num_layers=num_layers, holdout=hv)
    best = to_mantissa_bits(res.best, num_layers, args.bands)
    write_tuple(args.out, best)
    prior = int(start_summary.get("total_evaluations", start_summary.get("evaluations", 0))) \
        if start_summary else 0
    summary = {"delta": args.delta, "bands": args.bands, "band_layers": band_ranges(num_layers, args.bands),
               "start": args.start, "tokens": args.tokens, "context": args.context,
               "calib_split": args.calib_split, "calib_parts": args.calib_parts,
               "part_bounds": part_bounds(args.tokens, args.calib_parts),
               "w4a16_ppl": res.reference_ppl, "limit": (1 + args.delta) * res.reference_ppl,
               "w4a16_part_ppl": res.reference_parts,
               "best": best, "best_slots": res.best, "best_text": anda_widths.describe(best),
               "best_ppl": res.best_ppl, "feasible": res.feasible,
               "bops_vs_fp16_act": relative_bops(best, macs), "evaluations": res.evaluations,
               "start_evaluations": prior, "total_evaluations": prior + res.evaluations,
               "max_evals": args.max_evals, "cache_hits": ev.hits, "new_evaluations": ev.misses,
               "holdout_tokens": args.holdout_tokens, "holdout_w4a16_ppl": res.holdout_reference,
               "holdout_evaluations": res.holdout_evaluations, "history": res.history}
    if res.reference_parts:
        best_entry = next((h for h in res.history if h["widths"] == res.best), None)
        summary["best_part_ppl"] = best_entry and best_entry["part_ppl"]
        summary["best_worst_part_ratio"] = best_entry and best_entry["worst_part_ratio"]
    print(f"W4A16 calibration ppl {res.reference_ppl:.4f} ({args.calib_split}, {args.tokens} tokens, "
          f"context {args.context}); limit {(1 + args.delta) * res.reference_ppl:.4f} (delta {args.delta:g}); "
          f"{args.bands} band(s) {band_ranges(num_layers, args.bands)}")
    if res.reference_parts:
        print(f"per-part rule: {args.calib_parts} parts, W4A16 part ppl "
              f"{', '.join(f'{p:.4f}' for p in res.reference_parts)}")
    if hv is not None:
        print(f"held-out check: W4A16 ppl {res.holdout_reference:.4f} on {args.holdout_tokens} tokens of "
              f"'holdout'; {res.holdout_evaluations} held-out evaluations")
    for i, h in enumerate(res.history, 1):
        mb = to_mantissa_bits(h["widths"], num_layers, args.bands)
        worst = f" worst part {100 * (h['worst_part_ratio'] - 1):+.2f}%" if "worst_part_ratio" in h else ""
        if "holdout_ratio" in h:
            worst += f" held-out {100 * (h['holdout_ratio'] - 1):+.2f}%"
        print(f"  {i:2d} [{anda_widths.describe(mb)}] ppl {h['ppl']:.4f}{worst} "
              f"bops {relative_bops(mb, macs):.4f} {'accept' if h['accepted'] else 'reject'}")
    print(f"chosen [{summary['best_text']}] ppl {res.best_ppl:.4f}, BOPs {summary['bops_vs_fp16_act']:.4f} x "
          f"W4A16 (M=16) = {1 / summary['bops_vs_fp16_act']:.3f}x fewer; {res.evaluations} evaluations "
          f"(cap {args.max_evals}; {prior + res.evaluations} with the start's search), {ev.misses} new, "
          f"{ev.hits} from cache; -> {args.out}")
    if not res.feasible:
        first = res.history[0] if res.history else {}
        if "holdout_ratio" in first and first["holdout_ratio"] > 1 + args.delta:
            why = f"held-out {100 * (first['holdout_ratio'] - 1):+.2f}% > {100 * args.delta:g}%"
        elif res.reference_parts:
            why = f"worst part {100 * (summary['best_worst_part_ratio'] - 1):+.2f}% > {100 * args.delta:g}%"
        else:
            why = f"ppl {res.best_ppl:.4f} > {summary['limit']:.4f}"
        print(f"INFEASIBLE: the start widths already fail the tolerance ({why}); {args.out} holds the "
              f"start, not a searched tuple: start higher")
    if args.evaluator == "eager" and not args.no_verify:
        ev.close()
        if hv is not None:
            hv.close()
        cv = Evaluator(model, ids, context=args.context, stride=args.stride, mode="compile",
                       cache=ev.cache, setting=setting, parts=args.calib_parts)
        ppl = cv(best)
        summary["verify"] = v = {"compiled_ppl": ppl, "within_limit": ppl <= summary["limit"],
                                 "lowered": cv.last["lowered"], "quantized": len(linear_kinds(model)),
                                 "seconds": cv.last["seconds"]}
        if res.reference_parts:
            v.update(part_scores(cv.last["parts"], res.reference_parts))
            v["within_limit"] = all(r <= 1 + args.delta for r in v["part_ratio"])
        cv.close()
        print(f"verify: the chosen tuple compiled with backend='llmaccel' lowers {v['lowered']}/"
              f"{v['quantized']} linears; calibration ppl {ppl:.4f} (eager evaluator {res.best_ppl:.4f}), "
              f"{'within' if v['within_limit'] else 'OUTSIDE'} the limit")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"total {summary['seconds']:.0f} s")
    with open(Path(args.out).with_suffix(".search.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
