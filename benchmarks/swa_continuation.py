"""Short-continuation perplexity of SWA policies on SmolLM2-135M (issue 15, protocol (b)).

    python benchmarks/swa_continuation.py --threads 1 --sparsities 0.8 \
        --out benchmarks/out/swa_continuation.json --plot benchmarks/swa_continuation.png \
        --save-ids benchmarks/out/continuation_ids.json

Protocol: ``--windows`` consecutive, non-overlapping windows of the evaluation split, each
``--context`` tokens prefilled in one call (dense, seeds the scores) then ``--continuation`` tokens
fed one at a time, teacher-forced (the sparse decode path); scored are the ``--continuation``
tokens after the context (the first predicted by the prefill's last position). Perplexity over all
windows' scored tokens, per config, and the change against dense measured in the same run.
Every config runs through ``torch.compile(model.forward, backend="llmaccel", options=...)``
(``inner: eager``) on the same token ids; ``--save-ids`` writes those ids (no BOS) so that
``benchmarks/kvpress_continuation.py`` (another venv) scores the very same tokens.
Prints progress, a markdown table (one row per policy, one column per sparsity), writes JSON after
every config (a cut run keeps what it did, marked ``"partial": true``) and a plot.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from llm_compile.eval import data
from llm_compile.eval.model import compile_model, load_smollm2, uncompile_model

POLICIES = ("alisa", "h2o", "streaming", "quest", "recall", "oracle")


def windows(tokenizer, n: int, context: int, continuation: int) -> list[torch.Tensor]:
    """``n`` consecutive windows [1, context + continuation] of the evaluation split."""
    size = context + continuation
    ids = data.load_tokens(tokenizer, "evaluation", n * size)
    return [ids[:, i * size:(i + 1) * size] for i in range(n)]


def configs(sparsities, policies, sinks: int, variants: dict[str, dict] | None = None):
    out = [("dense", {"inner": "eager"})]
    for label, extra in [(p, {"policy": p}) for p in policies] + list((variants or {}).items()):
        for s in sparsities:
            swa = {**extra, "sparsity": s}
            if swa.get("policy") == "streaming" and sinks:
                swa["sink_tokens"] = sinks
            out.append((f"{label}@{s}", {"inner": "eager", "swa": swa}))
    return out


@torch.no_grad()
def continuation_nll(model, win: torch.Tensor, context: int) -> torch.Tensor:
    """NLL [continuation] of the tokens after ``context``: prefill, then one token per call."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=win[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    nll = [torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), win[0, context:context + 1])]
    for p in range(context, win.shape[1] - 1):
        out = model(input_ids=win[:, p:p + 1], past_key_values=out.past_key_values, use_cache=True,
                    logits_to_keep=1)
        nll.append(torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), win[0, p + 1:p + 2]))
    return torch.stack(nll)


def run_config(model, name, options, wins, context) -> dict:
    t0 = time.perf_counter()
    res = {"name": name, "options": options, "error": None}
    try:
        compile_model(model, options)
        per = []
        for i, w in enumerate(wins):
            per.append(continuation_nll(model, w, context))
            print(f"  {name}: window {i + 1}/{len(wins)} ppl {math.exp(per[-1].mean()):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        nll = torch.cat(per)
        res.update(ppl=math.exp(nll.mean().item()), n_scored=nll.numel(),
                   ppl_per_window=[math.exp(x.mean().item()) for x in per])
    except Exception as e:  # noqa: BLE001 - one failing config must not end a sweep
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"config {name} failed: {res['error']}", file=sys.stderr, flush=True)
    finally:
        uncompile_model(model)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def table(results, sparsities, labels) -> str:
    by = {r["name"]: r for r in results if not r.get("error")}
    dense = by.get("dense", {}).get("ppl")
    lines = ["| policy | " + " | ".join(f"sparsity {s}" for s in sparsities) + " |",
             "|---|" + "---:|" * len(sparsities),
             "| dense | " + " | ".join(f"{dense:.3f}" if dense else "-" for _ in sparsities) + " |"]
    for p in labels:
        cells = []
        for s in sparsities:
            v = by.get(f"{p}@{s}", {}).get("ppl")
            cells.append("-" if v is None else
                         f"{v:.3f} ({100 * (v / dense - 1):+.1f} %)" if dense else f"{v:.3f}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


KV_SHORT = {"ObservedAttentionPress": "H2O (Observed)", "ExpectedAttentionPress": "Expected",
            "SnapKVPress": "SnapKV", "TOVAPress": "TOVA", "StreamingLLMPress": "StreamingLLM"}


def kvpress_rows(path, sparsities) -> tuple[str, dict]:
    """Markdown rows of ``kvpress_continuation.py``'s JSON (vs that venv's dense-sdpa) and its points."""
    with open(path) as f:
        res = [r for r in json.load(f)["results"] if not r.get("error")]
    by = {r["name"]: r for r in res}
    dense = by.get("dense-sdpa", {}).get("ppl")
    lines, pts = [], {}
    for d in ("dense-sdpa", "dense-eager"):
        if d in by:
            lines.append(f"| kvpress venv {d} | " + " | ".join(f"{by[d]['ppl']:.3f}" for _ in sparsities) + " |")
    for press in dict.fromkeys(r["press"] for r in res if r.get("press")):
        ref = (by.get("dense-eager", {}).get("ppl") if press == "ObservedAttentionPress" else None) or dense
        cells = []
        for s in sparsities:
            v = by.get(f"{press}@{s}", {}).get("ppl")
            cells.append("-" if v is None else f"{v:.3f} ({100 * (v / ref - 1):+.1f} %)")
            if v is not None:
                pts.setdefault(press, []).append((s, 100 * (v / ref - 1)))
        lines.append(f"| kvpress {press} | " + " | ".join(cells) + " |")
    return "\n".join(lines), pts


def plot(results, sparsities, labels, path, kv_points=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["name"]: r for r in results if not r.get("error")}
    dense = by["dense"]["ppl"]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for p in labels:
        pts = [(s, 100 * (by[f"{p}@{s}"]["ppl"] / dense - 1)) for s in sparsities if f"{p}@{s}" in by]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=p)
    for press, pts in (kv_points or {}).items():
        ax.plot(*zip(*pts), marker="x", ls=":", label=f"kvpress {KV_SHORT.get(press, press)}")
    ax.axhline(0, ls="--", color="gray", label="dense")
    ax.set_xlabel("KV sparsity (share of KV bytes not read per step)"
                  + ("\nkvpress (dotted): compression ratio of the 1024-token context; keeps all continuation tokens"
                     if kv_points else ""), fontsize=8 if kv_points else None)
    ax.set_ylabel("continuation perplexity vs dense (%)")
    ax.set_title("SmolLM2-135M, context 1024 + 128 teacher-forced")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _labels(results):
    return tuple(dict.fromkeys(r["name"].split("@")[0] for r in results if "@" in r["name"]))


def _sparsities(results):
    return tuple(sorted({float(r["name"].split("@")[1]) for r in results if "@" in r["name"]}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", type=lambda s: tuple(float(x) for x in s.split(",") if x), default=(0.8,))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=JSON",
                    help="extra rows of swa options, e.g. 'recall-snapkv={\"policy\": \"recall\", \"seed\": \"snapkv\"}'")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--sinks", type=int, default=4, help="sink tokens for the streaming policy")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma list of config names to run, in order")
    ap.add_argument("--out", default="benchmarks/out/swa_continuation.json")
    ap.add_argument("--plot", default="benchmarks/swa_continuation.png")
    ap.add_argument("--save-ids", default=None, help="write the windows' token ids (JSON) for kvpress")
    ap.add_argument("--ids-only", action="store_true", help="with --save-ids: write the ids and stop")
    ap.add_argument("--merge", nargs="+", default=None, help="only print table/plot of these JSON files")
    ap.add_argument("--kvpress", default=None, help="with --merge: add the rows/points of this "
                    "kvpress_continuation.py JSON (change vs that venv's dense)")
    args = ap.parse_args(argv)
    if args.merge:
        results = []
        for path in args.merge:
            with open(path) as f:
                results += json.load(f)["results"]
        report(results, args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {}
    for spec in args.variant:
        label, _, js = spec.partition("=")
        variants[label] = json.loads(js)
    cfgs = configs(args.sparsities, [p for p in args.policies.split(",") if p], args.sinks, variants)
    if args.only:
        by = dict(cfgs)
        unknown = [n for n in args.only.split(",") if n not in by]
        if unknown:
            ap.error(f"--only: unknown configs {unknown}; known: {sorted(by)}")
        cfgs = [(n, by[n]) for n in args.only.split(",")]
    model, tok = load_smollm2()
    wins = windows(tok, args.windows, args.context, args.continuation)
    if args.save_ids:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_ids)), exist_ok=True)
        with open(args.save_ids, "w") as f:
            json.dump({"context": args.context, "continuation": args.continuation,
                       "windows": [w[0].tolist() for w in wins]}, f)
        print(f"wrote {args.save_ids}")
        if args.ids_only:
            return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = []
    for i, (name, options) in enumerate(cfgs):
        print(f"[{i + 1}/{len(cfgs)}] {name}", flush=True)
        results.append(run_config(model, name, options, wins, args.context))
        r = results[-1]
        print(f"[{i + 1}/{len(cfgs)}] {name}: ppl {r.get('ppl', float('nan')):.3f} ({r['seconds']} s)", flush=True)
        with open(args.out, "w") as f:
            json.dump({"protocol": {"context": args.context, "continuation": args.continuation,
                                    "windows": args.windows, "split": "evaluation", "threads": args.threads},
                       "partial": i + 1 < len(cfgs), "args": vars(args), "results": results}, f, indent=1)
    report(results, args)


def report(results, args) -> None:
    sp, labels = _sparsities(results), _labels(results)
    if getattr(args, "kvpress", None):
        with open(args.kvpress) as f:
            sp = tuple(sorted(set(sp) | {r["compression_ratio"] for r in json.load(f)["results"]
                                         if r.get("compression_ratio") is not None}))
    kv_rows, kv_points = kvpress_rows(args.kvpress, sp) if getattr(args, "kvpress", None) else ("", None)
    print("\nContinuation perplexity (change vs dense):\n" + table(results, sp, labels)
          + ("\n" + kv_rows if kv_rows else ""))
    if args.plot and any(r["name"] == "dense" and not r.get("error") for r in results):
        plot(results, sp, labels, args.plot, kv_points)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
