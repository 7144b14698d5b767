"""ALISA vs StreamingLLM vs H2O vs dense on SmolLM2-135M: streaming perplexity and passkey retrieval.

    python benchmarks/swa_accuracy.py --stream-tokens 4096 --passkey-lengths 2048,4096,8192 \
        --out benchmarks/out/swa_accuracy.json --plot benchmarks/out/swa_accuracy.png

Every config runs through ``torch.compile(model.forward, backend="llmaccel", options=...)`` on the
same evaluation-split tokens (the harness in ``llm_compile.eval``): dense = canonical attention with
SWA off; the others are ``{"swa": {"policy": P, "sparsity": S}}`` at the same budget. Prints a
markdown table (one row per policy, one column per sparsity), writes JSON and a plot of streaming
perplexity (and passkey accuracy) against sparsity, one line per policy.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from llm_compile.eval import runner
from llm_compile.eval.model import load_smollm2

POLICIES = ("alisa", "streaming", "h2o")


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def configs(sparsities, policies, inner: str, sinks: int, dense: bool = True,
            variants: dict[str, dict] | None = None) -> list[tuple[str, dict]]:
    """``[(name, options)]``: dense, every ``policy@sparsity``, and every ``label@sparsity`` of
    ``variants`` (``{label: extra swa options}``, e.g. ``{"alisa-kvhead": {"selection": "kv_head"}}``)."""
    out = [("dense", {"inner": inner})] if dense else []
    for p in policies:
        for s in sparsities:
            swa = {"policy": p, "sparsity": s}
            if p == "streaming" and sinks:
                swa["sink_tokens"] = sinks
            out.append((f"{p}@{s}", {"inner": inner, "swa": swa}))
    for label, extra in (variants or {}).items():
        for s in sparsities:
            out.append((f"{label}@{s}", {"inner": inner, "swa": {**extra, "sparsity": s}}))
    return out


def _variant(spec: str) -> tuple[str, dict]:
    label, sep, js = spec.partition("=")
    if not sep or "@" in label or not label:
        raise argparse.ArgumentTypeError(f"--variant wants LABEL=JSON (no '@' in LABEL), got {spec!r}")
    try:
        extra = json.loads(js)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--variant {label}: bad JSON {js!r}: {e}") from None
    if not isinstance(extra, dict) or "sparsity" in extra:
        raise argparse.ArgumentTypeError(f"--variant {label}: want a JSON object of swa options "
                                         "without 'sparsity' (set by --sparsities)")
    return label, extra


def table(results: list[dict], sparsities, policies, key: str, fmt: str) -> str:
    by = {r["name"]: r for r in results}
    dense = by["dense"]["row"].get(key)
    head = "| policy | " + " | ".join(f"sparsity {s}" for s in sparsities) + " |"
    lines = [head, "|---|" + "---|" * len(sparsities)]
    lines.append("| dense | " + " | ".join(format(dense, fmt) if dense is not None else "-" for _ in sparsities) + " |")
    for p in policies:
        cells = []
        for s in sparsities:
            r = by.get(f"{p}@{s}")
            v = None if r is None or r.get("error") else r["row"].get(key)
            if v is None:
                cells.append("error" if r and r.get("error") else "-")
            elif key == "stream_ppl" and dense:
                cells.append(f"{format(v, fmt)} ({100 * (v / dense - 1):+.1f}%)")
            else:
                cells.append(format(v, fmt))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, sparsities, policies, path: str, metrics) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["name"]: r["row"] for r in results if not r.get("error")}
    keys = [(k, t) for m, k, t in (("stream", "stream_ppl", "streaming perplexity"),
                                    ("passkey", "passkey", "passkey accuracy")) if m in metrics]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, (k, title) in zip(axes[0], keys):
        for p in policies:
            pts = [(s, by[f"{p}@{s}"][k]) for s in sparsities if f"{p}@{s}" in by and k in by[f"{p}@{s}"]]
            ax.plot([0.0] + [x for x, _ in pts], [by["dense"][k]] + [y for _, y in pts], marker="o", label=p)
        ax.axhline(by["dense"][k], ls="--", color="gray", label="dense")
        ax.set_xlabel("KV sparsity")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", type=_floats, default=(0.5, 0.8, 0.9))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--stream-tokens", type=int, default=4096)
    ap.add_argument("--passkey-lengths", type=_ints, default=(2048, 4096, 8192))
    ap.add_argument("--passkey-depths", type=_floats, default=(0.1, 0.5, 0.9))
    ap.add_argument("--passkey-decode-tail", type=int, default=64,
                    help="last prompt tokens fed one by one, so the sparse decode path reads the passkey")
    ap.add_argument("--metrics", default="stream,passkey")
    ap.add_argument("--prefill", type=int, default=0, help="leading tokens fed as one dense prefill")
    ap.add_argument("--sinks", type=int, default=4, help="sink tokens for the streaming policy")
    ap.add_argument("--inner", default="eager", choices=["eager", "inductor"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/out/swa_accuracy.json")
    ap.add_argument("--plot", default="benchmarks/out/swa_accuracy.png")
    ap.add_argument("--only", default=None,
                    help="comma list of configs to run, in this order (e.g. dense,alisa@0.8,h2o@0.8)")
    ap.add_argument("--variant", type=_variant, action="append", default=[], metavar="LABEL=JSON",
                    help="extra rows: swa options (e.g. 'alisa-kvhead={\"selection\": \"kv_head\"}') "
                         "run at every --sparsities value as LABEL@S; repeatable")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (e.g. when it runs in another process)")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="only print the table/plot of these JSON files (runs split over processes)")
    args = ap.parse_args(argv)
    if args.merge:
        results, settings = [], None
        for path in args.merge:
            with open(path) as f:
                d = json.load(f)
            results += d["results"]
            settings = runner.EvalSettings(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in d["settings"].items()})
        report(results, settings, args, time.perf_counter())
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = tuple(p for p in args.policies.split(",") if p)
    settings = runner.EvalSettings(
        metrics=tuple(args.metrics.split(",")), stream_tokens=args.stream_tokens, prefill=args.prefill,
        passkey_lengths=args.passkey_lengths, passkey_depths=args.passkey_depths,
        passkey_decode_tail=args.passkey_decode_tail)
    cfgs = configs(args.sparsities, policies, args.inner, args.sinks, dense=not args.no_dense,
                   variants=dict(args.variant))
    if args.only:
        by = dict(cfgs)
        unknown = [n for n in args.only.split(",") if n not in by]
        if unknown:
            ap.error(f"--only: unknown configs {unknown}; known: {sorted(by)}")
        cfgs = [(n, by[n]) for n in args.only.split(",")]
    model, tok = load_smollm2()
    t0 = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = []
    for cfg in cfgs:  # one config at a time, the JSON rewritten after each (long runs can be cut)
        results += runner.run_configs(model, tok, [cfg], settings)
        with open(args.out, "w") as f:
            json.dump({"settings": runner.settings_dict(settings), "args": vars(args),
                       "meta": runner.run_metadata(), "results": results}, f, indent=1, default=str)
        print(f"wrote {args.out} ({len(results)}/{len(cfgs)} configs)", flush=True)
    if not args.no_dense:
        report(results, settings, args, t0)


def report(results, settings, args, t0) -> None:
    policies = tuple(dict.fromkeys(r["name"].split("@")[0] for r in results if "@" in r["name"]))
    sparsities = tuple(sorted({float(r["name"].split("@")[1]) for r in results if "@" in r["name"]}))
    for r in results:
        if r.get("error"):
            print(f"config {r['name']} failed: {r['error']}")
    print(f"\nSmolLM2-135M-Instruct, evaluation split, {settings.stream_tokens} tokens streamed "
          f"(first {settings.prefill} as one dense prefill, the rest one by one)\n")
    if "stream" in settings.metrics:
        print("Streaming perplexity (change vs dense):\n" + table(results, sparsities, policies, "stream_ppl", ".3f"))
    if "passkey" in settings.metrics:
        print(f"\nPasskey accuracy over lengths {list(settings.passkey_lengths)} x depths {list(settings.passkey_depths)}:\n"
              + table(results, sparsities, policies, "passkey", ".2f"))
        for r in results:
            pk = r["metrics"].get("passkey", {})
            if pk.get("by_length"):
                found = sum(a["ok"] for cell in pk.get("grid", []) for a in cell["answers"])
                trials = sum(len(cell["answers"]) for cell in pk.get("grid", []))
                print(f"  {r['name']}: found {found} / {trials}; by length "
                      + ", ".join(f"{k}: {v:.2f}" for k, v in pk["by_length"].items()) + "; by depth "
                      + ", ".join(f"{k}: {v:.2f}" for k, v in pk.get("by_depth", {}).items()))
    if args.plot:
        plot(results, sparsities, policies, args.plot, settings.metrics)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
