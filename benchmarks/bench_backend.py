"""SmolLM2-135M: eager, stock ``backend="inductor"`` and llmaccel configs, in ONE run.

    python benchmarks/bench_backend.py --threads 1 --prompt 50 --tokens 32 --repeats 3 \
        --out benchmarks/out/backend.json

Every config runs in its own worker process (one compile each, its own fresh Inductor cache
folder, so the cold compile is really cold); the workers stay alive and the parent asks them for
one measurement at a time, round-robin, so that the ``--repeats`` repeats of all configs are
interleaved (a load change on a shared machine hits every config alike). One measurement: greedy
``generate`` of 1 new token (= prefill) and of ``--tokens + 1`` new tokens, both timed; prefill
tokens/s = prompt length / prefill time, decode tokens/s = ``--tokens`` / (full - prefill time).
Reported: the median over repeats, the spread (min-max), and the ratio to stock Inductor computed
per repeat (median and spread of the per-repeat ratios).

Compile time (``--parallel-compile``: all workers compile at the same time, which only a very
busy machine justifies; ratios then compare configs under the same contention): ``cold`` = the
worker's warm-up (``generate`` of 3 tokens: prefill, static and
dynamic decode graphs) with an empty Inductor cache; ``warm`` = the same in a second process
started afterwards with that config's cache folder (Inductor's FX graph and AOTAutograd caches
filled). Both include running the 3 tokens (well under a second here).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS: dict[str, tuple[str | None, dict | None]] = {
    "eager": (None, None),
    "inductor": ("inductor", {}),
    "llmaccel-off": ("llmaccel", {}),
    "kv_store": ("llmaccel", {"kv_store": True}),
    "swa-0.8": ("llmaccel", {"swa": {"sparsity": 0.8}}),
}
EXTRA_CONFIGS = {
    "llmaccel-canon": ("llmaccel", {"canonicalize": True}),  # {} + the canonical attention op
    "inner-eager": ("llmaccel", {"inner": "eager"}),
}
BASELINE = "inductor"


# ----------------------------------------------------------------------------- worker side
def _worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from llm_compile.eval.data import load_tokens
    from llm_compile.eval.model import compile_model, load_smollm2

    backend, options = {**CONFIGS, **EXTRA_CONFIGS}[args.worker]
    if args.layers:  # a quick proxy: random weights, SmolLM2's shapes, fewer layers
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
            rope_theta=100000.0, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    else:
        model, tok = load_smollm2()
        ids = load_tokens(tok, "evaluation", args.prompt)

    last = {}

    def gen(n):
        with torch.no_grad():
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            dt = time.perf_counter() - t
        last["tokens"] = out[0, ids.shape[1]:].tolist()
        return dt

    if backend is not None:
        compile_model(model, options, backend=backend)
    compile_s = gen(3)
    _say({"ready": args.worker, "compile_s": compile_s})
    for line in sys.stdin:
        if line.strip() != "measure":
            break
        prefill = gen(1)
        full = gen(args.tokens + 1)
        _say({"prefill_s": prefill, "full_s": full, "prefill_tok_s": args.prompt / prefill,
              "decode_tok_s": args.tokens / max(full - prefill, 1e-9), "tokens": last["tokens"]})


def _say(obj) -> None:
    print("@@" + json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------- parent side
class Worker:
    def __init__(self, name: str, args, cache_dir: str):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, OMP_NUM_THREADS=str(args.threads),
                   TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--threads", str(args.threads),
               "--prompt", str(args.prompt), "--tokens", str(args.tokens), "--layers", str(args.layers)]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()})")

    def ask(self) -> dict:
        self.proc.stdin.write("measure\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": xs}


def run(args) -> dict:
    names = args.configs.split(",")
    known = {**CONFIGS, **EXTRA_CONFIGS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"bench_backend: unknown configs {unknown}; choose from {list(known)}")
    root = args.cache_root or tempfile.mkdtemp(prefix="llmaccel_bench_")
    # a config whose cache folder is already filled (--cache-root of an earlier run) compiles warm
    warm_from_start = {n for n in names if os.path.isdir(os.path.join(root, n)) and os.listdir(os.path.join(root, n))}
    workers, compile_cold = {}, {}
    try:
        if args.parallel_compile:  # all compile at once (a busy machine: wall time of the slowest)
            for name in names:
                workers[name] = Worker(name, args, os.path.join(root, name))
        for name in names:  # else one after the other (compile times not disturbed by each other)
            w = workers.get(name) or Worker(name, args, os.path.join(root, name))
            compile_cold[name] = w.read()["compile_s"]
            print(f"{name:18s} ready, cold compile + 3 tokens {compile_cold[name]:7.1f} s", flush=True)
            workers[name] = w
        samples = {n: [] for n in names}
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]  # alternate the order as well
            for name in order:
                samples[name].append(workers[name].ask())
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{n} {samples[n][-1]['decode_tok_s']:.2f}" for n in names), flush=True)
    finally:
        for w in workers.values():
            w.close()
    compile_warm = {n: compile_cold.pop(n) for n in warm_from_start}
    if not args.no_warm:
        compiled = [n for n in names if known[n][0] is not None and n not in compile_warm]
        pending = {n: Worker(n, args, os.path.join(root, n)) for n in compiled} if args.parallel_compile else {}
        for name in compiled:
            w = pending.get(name) or Worker(name, args, os.path.join(root, name))
            try:
                compile_warm[name] = w.read()["compile_s"]
            finally:
                w.close()
            print(f"{name:18s} warm compile + 3 tokens {compile_warm[name]:7.1f} s", flush=True)
    rows = []
    base = samples.get(BASELINE)
    for name in names:
        s = samples[name]
        row = {"config": name, "backend": known[name][0], "options": known[name][1],
               "decode_tok_s": _stats([x["decode_tok_s"] for x in s]),
               "prefill_tok_s": _stats([x["prefill_tok_s"] for x in s]),
               "compile_cold_s": compile_cold.get(name) if known[name][0] else None,
               "compile_warm_s": compile_warm.get(name)}
        ref = samples.get("eager")
        if ref is not None:  # greedy tokens equal to eager's (a passes-off config must match all)
            row["tokens_equal_eager"] = min(
                next((i for i, (a, b) in enumerate(zip(x["tokens"], ref[0]["tokens"])) if a != b), len(x["tokens"]))
                for x in s)
        if base is not None:
            for key in ("decode_tok_s", "prefill_tok_s"):
                row[f"{key}_vs_{BASELINE}"] = _stats([a[key] / b[key] for a, b in zip(s, base)])
        rows.append(row)
    return {"args": vars(args), "rows": rows, "cache_root": root}


def table(result: dict) -> str:
    a = result["args"]
    model = "SmolLM2-135M-Instruct" if not a.get("layers") else f"SmolLM2 shapes, random weights, {a['layers']} layers"
    lines = [f"{model}, {a['prompt']}-token prompt, {a['tokens']} greedy new tokens, batch 1, "
             f"{a['threads']} thread(s), {a['repeats']} interleaved repeats (median, [min-max]), "
             f"{'compiled in parallel, ' if a.get('parallel_compile') else ''}"
             f"{platform.processor() or platform.machine()}",
             "",
             f"| config | decode tok/s | vs {BASELINE} | prefill tok/s | vs {BASELINE} | compile cold (s) | "
             f"warm (s) | cold vs {BASELINE} | warm vs {BASELINE} | tokens = eager |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {r["config"]: r for r in result["rows"]}
    base = rows.get(BASELINE)

    def st(s, fmt="{:.2f}"):
        return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"

    def ratio(r, key):
        return st(r[f"{key}_vs_{BASELINE}"], "{:.2f}") + "x" if f"{key}_vs_{BASELINE}" in r else "-"

    def comp(r, key):
        return "-" if r[key] is None else f"{r[key]:.1f}"

    def comp_ratio(r, key):
        if base is None or r[key] is None or base[key] is None:
            return "-"
        return f"{r[key] / base[key]:.2f}x"

    for r in result["rows"]:
        label = r["config"] if r["backend"] != "llmaccel" else f"{r['config']} `{json.dumps(r['options'])}`"
        lines.append(f"| {label} | {st(r['decode_tok_s'])} | {ratio(r, 'decode_tok_s')} | "
                     f"{st(r['prefill_tok_s'], '{:.1f}')} | {ratio(r, 'prefill_tok_s')} | "
                     f"{comp(r, 'compile_cold_s')} | {comp(r, 'compile_warm_s')} | "
                     f"{comp_ratio(r, 'compile_cold_s')} | {comp_ratio(r, 'compile_warm_s')} | "
                     f"{r.get('tokens_equal_eager', '-')}/{a['tokens'] + 1} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=50, help="prompt tokens (evaluation split)")
    ap.add_argument("--tokens", type=int, default=32, help="timed greedy new tokens")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per config (>= 3 for a spread)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=0,
                    help="0: the real SmolLM2-135M; N: a random-weight model of its shapes with N layers "
                         "(a quick proxy on a busy machine)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma list of {list(CONFIGS) + list(EXTRA_CONFIGS)}")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-compile processes")
    ap.add_argument("--parallel-compile", action="store_true",
                    help="start every worker at once (compile times then share the CPU: only their "
                         "ratios mean something); timed repeats stay one at a time")
    ap.add_argument("--cache-root", default=None, help="Inductor cache folders (default: a new temp dir)")
    ap.add_argument("--out", default="benchmarks/out/backend.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.prompt < 1 or args.tokens < 1 or args.threads < 1:
        ap.error("--repeats, --prompt, --tokens and --threads must be >= 1")
    known = {**CONFIGS, **EXTRA_CONFIGS}
    bad = [n for n in args.configs.split(",") if n not in known]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {list(known)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        _worker(args)
        return
    result = run(args)
    text = table(result)
    print("\n" + text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    import torch

    result["torch"] = torch.__version__
    result["table"] = text
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
