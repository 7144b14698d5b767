"""Anda accuracy on SmolLM2-135M-Instruct: evaluation-split perplexity and BOPs, one command.

    python benchmarks/anda_accuracy.py --tuple "d=1%=anda_tuple_d1.json" --tuple "d=0.1%=anda_tuple_d01.json"
    python benchmarks/anda_accuracy.py --delta 0.01 0.001      # runs the searches first (cached)

Rows: FP32 (the model as loaded: the GGUF file dequantized to float), W4A16 (eager, float
activations; ``--weights gguf``, the default: the GGUF file's own Q4_1 integers, so W4A16 equals
FP32; ``--weights requant``: ``quantize_weights`` symmetric INT4, group 64, the old baseline), uniform Anda widths ``M`` (``--uniform``, default 4..8, every module kind) and the
searched tuples (``--tuple NAME=PATH`` files written by ``python -m llm_compile.anda_cli``: a kind
dict or, from a layer-band search, a per-layer list; or ``--delta`` to search here with the same
calibration settings and cache). ``--calib`` adds each row's calibration-split perplexity with the
eager evaluator (the search's own numbers, from the cache) and the evaluations its search spent
(from the tuple file's ``.search.json``), side by side with the evaluation split; ``--calib-split``
picks the calibration split (``calibration``, default, or ``calibration-wide``: as the search CLI's
flag) and ``--calib-parts K`` adds the worst part's ratio to W4A16 (the CLI's per-part rule; the
same K reuses a per-part search's cached evaluations). Every Anda row is the
model compiled with ``backend="llmaccel"``, ``options={"anda": {"mantissa_bits": ..., "kernel":
"reference"}, "inner": "eager"}`` (the reference kernel is the generated Triton kernels' math in
torch, fast on CPU); the table says how many linears each compiled graph lowered.

BOPs (bit operations) per token = sum over the quantized linears (q, k, v, o, gate, up, down of all
layers; not attention scores, not lm_head) of ``MACs * weight bits * activation bits``, with
activation bits = ``M`` for Anda and 16 for W4A16's FP16 activations; the table gives
``BOPs / BOPs(W4A16)`` (weights are INT4 in both, so this is ``sum MACs_k M_k / (16 sum MACs_k)``).

Perplexity: ``llm_compile.eval.metrics.perplexity`` on the first ``--tokens`` tokens of the
*evaluation* split (Luke, John), windows of ``--context`` tokens (disjoint by default). Evaluations
are memoised in ``--cache`` (shared with the search CLI). Prints a markdown table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import torch

from pathlib import Path

from llm_compile.anda_cli import (CALIB_SPLITS, DEFAULT_CONTEXT, DEFAULT_GROUP, DEFAULT_TOKENS, MODEL_NAME,
                                  WEIGHTS, positive_int, load_w4_model, model_macs, part_scores,
                                  relative_bops, run_search, weights_setting)
from llm_compile.anda_eval import EvalCache, Evaluator
from llm_compile.anda_widths import ANDA_MODULE_KINDS, describe, normalise


def _row(name, widths, ppl, ref, macs, last, n_quant):
    return {"config": name, "widths": widths, "widths_text": None if widths is None else describe(widths),
            "ppl": ppl,
            "vs_w4a16": None if ref is None else ppl / ref - 1.0,
            "bops_vs_w4a16": None if widths is None else relative_bops(widths, macs),
            "lowered": last.get("lowered"), "quantized": n_quant, "seconds": last.get("seconds"),
            "cached": last.get("cached")}


def _pct(v):
    return "—" if v is None else f"{100 * v:+.2f}%"


def markdown(rows, args) -> str:
    from llm_compile.eval.data import split_books

    calib = any("calib_ppl" in r for r in rows)
    parts = calib and any("calib_worst_part" in r for r in rows)
    out = [f"SmolLM2-135M-Instruct, evaluation split (Luke, John), {args.tokens} tokens, context "
           f"{args.context}; INT4 weights: "
           f"{'GGUF Q4_1 (lossless)' if args.weights == 'gguf' else f're-quantized, group {args.group_size}'}; Anda rows compiled with "
           f"backend=\"llmaccel\" (kernel \"reference\")"
           + (f"; calibration split {args.calib_split} ({', '.join(split_books(args.calib_split))}) "
              f"{args.calib_tokens} tokens, eager evaluator (as the search)"
              + (f", worst of {args.calib_parts} parts" if parts else "") + "." if calib else "."), ""]
    if calib:
        wp = " worst part vs W4A16 |" if parts else ""
        out += ["| config | M (qkv, o, gate_up, down) | calib ppl | vs W4A16 |" + wp + " eval ppl | vs W4A16 | "
                "BOPs / W4A16 | fewer BOPs | evaluations | linears lowered |",
                "|---|---|---|---|" + ("---|" if parts else "") + "---|---|---|---|---|---|"]
    else:
        out += ["| config | M (qkv, o, gate_up, down) | eval ppl | vs W4A16 | BOPs / W4A16 | linears lowered |",
                "|---|---|---|---|---|---|"]
    for r in rows:
        w = r["widths_text"] or "—"
        b = "—" if r["bops_vs_w4a16"] is None else f"{r['bops_vs_w4a16']:.3f}"
        low = "—" if r["lowered"] is None else f"{r['lowered']}/{r['quantized']}"
        if calib:
            c = "—" if r.get("calib_ppl") is None else f"{r['calib_ppl']:.4f}"
            x = "—" if not r["bops_vs_w4a16"] else f"{1 / r['bops_vs_w4a16']:.2f}×"
            wp = f" {_pct(r['calib_worst_part'] - 1.0)} |" if parts and "calib_worst_part" in r else (
                " — |" if parts else "")
            out.append(f"| {r['config']} | {w} | {c} | {_pct(r.get('calib_vs_w4a16'))} |{wp} {r['ppl']:.4f} | "
                       f"{_pct(r['vs_w4a16'])} | {b} | {x} | {r.get('evaluations') or '—'} | {low} |")
        else:
            out.append(f"| {r['config']} | {w} | {r['ppl']:.4f} | {_pct(r['vs_w4a16'])} | {b} | {low} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tuple", action="append", default=[], metavar="NAME=PATH",
                    help="a searched tuple file ({'mantissa_bits': {...}}); repeatable")
    ap.add_argument("--delta", type=float, nargs="*", default=[],
                    help="run the search (calibration split, shared cache) for these deltas")
    ap.add_argument("--uniform", type=int, nargs="*", default=[4, 5, 6, 7, 8])
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation-split tokens")
    ap.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    ap.add_argument("--calib-tokens", type=int, default=DEFAULT_TOKENS, help="search: calibration tokens")
    ap.add_argument("--weights", choices=WEIGHTS, default="gguf",
                    help="W4A16 baseline: GGUF Q4_1 integers (default) or 'requant' (symmetric RTN)")
    ap.add_argument("--group-size", type=int, default=DEFAULT_GROUP, help="requant: INT4 group")
    ap.add_argument("--calib", action="store_true",
                    help="also give each row's calibration-split ppl (eager evaluator, as the search: "
                         "cached values from the search are reused) and the search's evaluations")
    ap.add_argument("--calib-split", choices=CALIB_SPLITS, default="calibration",
                    help="calibration split of --calib and --delta (as anda_cli's --calib-split)")
    ap.add_argument("--calib-parts", type=positive_int, default=1, metavar="K",
                    help="--calib: also the worst of K parts vs W4A16 (as anda_cli's --calib-parts); "
                         "--delta: search with the per-part rule")
    ap.add_argument("--cache", default="anda_search_cache.json")
    ap.add_argument("--out", default="anda_accuracy.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    from llm_compile.eval.data import load_tokens
    from llm_compile.eval.model import load_smollm2

    model, tok = load_smollm2()
    ids = load_tokens(tok, "evaluation", args.tokens)
    cache = EvalCache(args.cache or None)
    setting = {"model": MODEL_NAME, "weights": weights_setting(args.weights, args.group_size),
               "split": "evaluation"}
    fp32 = Evaluator(model, ids, context=args.context, cache=cache,
                     setting=dict(setting, weights="fp32"))
    ppl_fp32 = fp32.reference()                      # the unquantized model, eager
    fp32_last = fp32.last
    fp32.close()
    model, _ = load_w4_model(args.weights, 4, args.group_size)
    n_quant = len(model.llmaccel_quantized)
    macs = model_macs(model)

    tuples = []
    evals = {}
    for spec in args.tuple:
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(path)
        with open(path) as f:
            tuples.append((name, json.load(f)["mantissa_bits"]))
        summary = Path(path).with_suffix(".search.json")
        if summary.is_file():
            s = json.loads(summary.read_text())
            evals[name] = s.get("total_evaluations", s.get("evaluations"))
    searches = []
    if args.delta:
        calib = Evaluator(model, load_tokens(tok, args.calib_split, args.calib_tokens), context=args.context,
                          cache=cache, setting=dict(setting, split=args.calib_split), parts=args.calib_parts)
        for d in args.delta:
            res = run_search(calib, macs, d)
            searches.append({"delta": d, "best": res.best, "calib_ppl": res.best_ppl,
                             "calib_w4a16": res.reference_ppl, "evaluations": res.evaluations})
            tuples.append((f"searched δ={100 * d:g}%", res.best))
        calib.close()

    ev = Evaluator(model, ids, context=args.context, cache=cache, setting=setting)
    ref = ev.reference()
    rows = [_row("FP32", None, ppl_fp32, ref, macs, fp32_last, n_quant),
            _row("W4A16 (eager)", None, ref, ref, macs, dict(ev.last, lowered=None), n_quant)]
    rows[0]["vs_w4a16"] = ppl_fp32 / ref - 1.0
    rows[1]["bops_vs_w4a16"] = 1.0
    rows[0]["lowered"] = None
    for m in args.uniform:
        w = dict.fromkeys(ANDA_MODULE_KINDS, m)
        rows.append(_row(f"Anda M={m}", w, ev(w), ref, macs, ev.last, n_quant))
        print(f"  {rows[-1]['config']}: ppl {rows[-1]['ppl']:.4f}", file=sys.stderr, flush=True)
    for name, w in tuples:
        w = normalise(w)
        rows.append(_row(name, w, ev(w), ref, macs, ev.last, n_quant))
        rows[-1]["evaluations"] = evals.get(name)
        print(f"  {name}: ppl {rows[-1]['ppl']:.4f}", file=sys.stderr, flush=True)
    ev.close()
    if args.calib:                   # calibration split, eager evaluator: the search's own numbers
        cal = Evaluator(model, load_tokens(tok, args.calib_split, args.calib_tokens), context=args.context,
                        mode="eager", cache=cache, setting=dict(setting, split=args.calib_split),
                        parts=args.calib_parts)
        cref = cal.reference()
        cref_parts = cal.last.get("parts")
        for r in rows[1:]:
            r["calib_ppl"] = cref if r["widths"] is None else cal(r["widths"])
            r["calib_vs_w4a16"] = r["calib_ppl"] / cref - 1.0
            if args.calib_parts > 1:
                sc = part_scores(cal.last["parts"] if r["widths"] is not None else cref_parts, cref_parts)
                r["calib_part_ppl"], r["calib_worst_part"] = sc["part_ppl"], sc["worst_part_ratio"]
        cal.close()
    table = markdown(rows, args)
    print(table)
    result = {"model": MODEL_NAME, "split": "evaluation", "tokens": args.tokens, "context": args.context,
              "calib_split": args.calib_split if (args.calib or args.delta) else None,
              "calib_parts": args.calib_parts if (args.calib or args.delta) else None,
              "weight_bits": 4, "weights": args.weights,
              "group_size": 32 if args.weights == "gguf" else args.group_size, "macs_per_token": macs,
              "searches": searches, "rows": rows, "markdown": table,
              "seconds": round(time.perf_counter() - t_start, 1),
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{len(rows)} rows in {result['seconds']:.0f} s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
