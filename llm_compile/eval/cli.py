"""``python -m llm_compile.eval`` / ``llmaccel-eval``: evaluate backend configs on SmolLM2-135M.

Examples::

    # eager baseline and llmaccel with every pass off, all metrics, small sizes
    python -m llm_compile.eval --with-eager --options '{}' --out results.json

    # one config
    python -m llm_compile.eval --options '{"swa": {"sparsity": 0.8}, "inner": "eager"}' \\
        --metrics stream,passkey

    # sweep one option (on top of --options), plot each metric vs the value
    python -m llm_compile.eval --options '{"inner": "eager"}' --sweep swa.sparsity=0,0.5,0.8,0.9 \\
        --metrics stream,agree --with-eager --plot swa.png

    # several named configs in one table
    python -m llm_compile.eval --configs off='{}' alisa='{"swa": {"sparsity": 0.8}}' \\
        --configs streaming='{"swa": {"sparsity": 0.8, "policy": "streaming"}}'
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

logger = logging.getLogger(__name__)


def _ints(text: str) -> tuple[int, ...]:
    """``"1024,2k,8k"`` -> ``(1024, 2048, 8192)``."""
    out = []
    for x in (t.strip().lower() for t in text.split(",") if t.strip()):
        out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
    return tuple(out)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llm_compile.eval",
        description="Evaluate llmaccel backend configs on SmolLM2-135M-Instruct (CPU, offline): "
                    "teacher-forced and streaming perplexity, passkey retrieval, greedy agreement.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("configs")
    g.add_argument("--options", default="{}",
                   help="JSON dict for torch.compile(..., backend='llmaccel', options=...); "
                        "'none' = uncompiled eager model. Base of --sweep.")
    g.add_argument("--eager", action="store_true", help="same as --options none")
    g.add_argument("--name", default=None, help="table name of the --options config")
    g.add_argument("--configs", nargs="+", action="extend", default=[], metavar="NAME=JSON",
                   help="named configs (JSON dict or 'none'), repeatable; replaces the --options row")
    g.add_argument("--sweep", action="append", default=[], metavar="PATH=V1,V2,...",
                   help="vary the dotted option PATH over the values (JSON each) on top of "
                        "--options; repeatable (one series per --sweep)")
    g.add_argument("--with-eager", action="store_true",
                   help="add the uncompiled eager model as the first row (and plot reference)")
    g.add_argument("--backend", default="llmaccel",
                   help="torch.compile backend (options only go to llmaccel)")
    g.add_argument("--dynamic", choices=("auto", "true", "false"), default="auto",
                   help="torch.compile(dynamic=...): auto = None (automatic dynamic shapes)")
    m = p.add_argument_group("metrics and sizes")
    m.add_argument("--metrics", default="ppl,stream,passkey,agree",
                   help="comma list of ppl, stream, passkey, agree")
    m.add_argument("--split", default="evaluation", choices=("evaluation", "calibration"))
    m.add_argument("--tokens", type=int, default=4096, help="tokens for teacher-forced ppl")
    m.add_argument("--context", type=int, default=2048, help="ppl window length")
    m.add_argument("--stride", type=int, default=1024, help="ppl window stride")
    m.add_argument("--stream-tokens", type=int, default=1024,
                   help="tokens fed one by one for streaming ppl (<= 8192)")
    m.add_argument("--prefill", type=int, default=0,
                   help="streaming: leading tokens fed in one call (0 = token by token)")
    m.add_argument("--segment", type=int, default=256, help="streaming: ppl reported per segment")
    m.add_argument("--passkey-lengths", type=_ints, default=(1024, 2048),
                   help="prompt lengths in tokens, e.g. 1024,2048 or 2k,4k,8k")
    m.add_argument("--passkey-depths", type=_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0),
                   help="relative needle depths in [0, 1]")
    m.add_argument("--passkey-trials", type=int, default=1, help="random keys per length x depth")
    m.add_argument("--passkey-filler", choices=("grass", "bible"), default="grass")
    m.add_argument("--passkey-decode-tail", type=int, default=0,
                   help="feed the last N prompt tokens one per call (decode-time attention)")
    m.add_argument("--agree-n", type=int, default=4, help="agreement: number of prompts")
    m.add_argument("--agree-tokens", type=int, default=32, help="agreement: tokens generated each")
    m.add_argument("--agree-prompt", type=int, default=64, help="agreement: prompt length")
    m.add_argument("--seed", type=int, default=0, help="passkey keys and filler offsets")
    o = p.add_argument_group("model, machine, output")
    o.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    o.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers attn_implementation")
    o.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a small shared machine; 0 = torch default)")
    o.add_argument("--out", default=None, help="write results JSON here")
    o.add_argument("--plot", default=None,
                   help="PNG path (sweeps: one file per --sweep, suffixed with the option path "
                        "when there are several; default <out>.png or eval_sweep.png)")
    o.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    o.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    return p


def build_configs(args) -> tuple[list[tuple[str, dict | None]], list[tuple[str, list, list[int]]]]:
    """Configs ``[(name, options)]`` and sweeps ``[(path, values, config indices)]`` from ``args``."""
    from .runner import parse_options, parse_value, set_option_path

    base = None if args.eager else parse_options(args.options)
    configs: list[tuple[str, dict | None]] = []
    sweeps = []
    if args.with_eager:
        configs.append(("eager", None))
    for item in args.configs:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--configs expects NAME=JSON, got {item!r}")
        configs.append((name, parse_options(text)))
    for spec in args.sweep:
        path, sep, vals = spec.partition("=")
        if not sep or not path or not vals:
            raise SystemExit(f"--sweep expects PATH=V1,V2,..., got {spec!r}")
        if base is None:
            raise SystemExit("--sweep needs llmaccel --options (not --eager / none) as its base")
        values = [parse_value(v) for v in vals.split(",")]
        idx = []
        for v in values:
            idx.append(len(configs))
            configs.append((f"{path}={json.dumps(v)}", set_option_path(base, path, v)))
        sweeps.append((path, values, idx))
    if not args.configs and not args.sweep:
        name = args.name or ("eager" if base is None else "llmaccel")
        if not (args.with_eager and base is None):
            configs.append((name, base))
    names = [c[0] for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"duplicate config names {dup}; use --name / --configs NAME=...")
    return configs, sweeps


def _settings(args):
    from .runner import EvalSettings

    metrics = tuple(x.strip() for x in args.metrics.split(",") if x.strip())
    return EvalSettings(
        metrics=metrics, split=args.split, tokens=args.tokens, context=args.context,
        stride=args.stride, stream_tokens=args.stream_tokens, prefill=args.prefill,
        segment=args.segment, passkey_lengths=args.passkey_lengths,
        passkey_depths=args.passkey_depths, passkey_trials=args.passkey_trials,
        passkey_filler=args.passkey_filler, passkey_decode_tail=args.passkey_decode_tail,
        agree_n=args.agree_n, agree_tokens=args.agree_tokens, agree_prompt=args.agree_prompt,
        backend=args.backend, dynamic={"auto": None, "true": True, "false": False}[args.dynamic],
        seed=args.seed, progress=not args.no_progress)


def _plot_paths(args, sweeps) -> list[str]:
    if args.plot:
        root, ext = os.path.splitext(args.plot)
    elif args.out:
        root, ext = os.path.splitext(args.out)[0], ".png"
    else:
        root, ext = "eval_sweep", ".png"
    ext = ext or ".png"
    if len(sweeps) <= 1:
        return [root + ext]
    return [f"{root}-{path}{ext}" for path, _, _ in sweeps]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 when a config failed)."""
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = _settings(args)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    configs, sweeps = build_configs(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from .model import load_smollm2
    from .report import markdown_table, options_legend, plot_configs, plot_sweep
    from .runner import run_configs, run_metadata, settings_dict

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(dtype=getattr(torch, args.dtype), attn_implementation=args.attn)
    results = run_configs(model, tokenizer, configs, settings)

    print()
    print(markdown_table(results))
    print()
    print(options_legend(results))
    for r in results:
        if r.get("error"):
            print(f"\n{r['name']} failed:\n{r.get('traceback', r['error'])}", file=sys.stderr)

    plots = []
    eager = next((r for r in results if r["options"] is None), None)
    if sweeps:
        for (path, values, idx), png in zip(sweeps, _plot_paths(args, sweeps)):
            plots.append(plot_sweep([results[i] for i in idx], path, values, png, reference=eager))
    elif args.plot and len(results) > 1:
        plots.append(plot_configs(results, args.plot))
    for png in plots:
        print(f"plot: {png}")

    if args.out:
        doc = dict(command=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
                   settings=settings_dict(settings), meta=dict(run_metadata(),
                   dtype=args.dtype, attn=args.attn, total_seconds=round(time.perf_counter() - t0, 1)),
                   sweeps=[dict(path=p, values=v, configs=[results[i]["name"] for i in idx])
                           for p, v, idx in sweeps],
                   results=results, plots=plots)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"results: {args.out}")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
