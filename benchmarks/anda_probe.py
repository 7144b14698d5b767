"""Anda width probe: calibration-split perplexity of hand-picked width settings, through the same
Evaluator (eager, kernel "reference") and cache keys as ``python -m llm_compile.anda_cli --weights gguf
--tokens N``, so a later search reuses them.

    python benchmarks/anda_probe.py 2048 cache.json benchmarks/anda_tuples/gguf_calib2048_probe.json

The spec file is a JSON list of ``[name, widths]``; widths an int, a kind dict or a per-layer list
(``options={"anda": {"mantissa_bits": ...}}`` forms). Prints ppl, % vs W4A16 and BOPs / FP16 act.
"""
import json, sys, time
import torch
from llm_compile.anda_cli import load_w4_model, MODEL_NAME, weights_setting, model_macs, relative_bops
from llm_compile.anda_eval import Evaluator, EvalCache
from llm_compile.anda_bands import band_ranges
from llm_compile.eval.data import load_tokens
torch.set_num_threads(1)
tokens, cache, spec = int(sys.argv[1]), sys.argv[2], json.load(open(sys.argv[3]))
model, tok = load_w4_model("gguf")
ids = load_tokens(tok, "calibration", tokens)
ev = Evaluator(model, ids, context=512, mode="eager", cache=EvalCache(cache),
               setting={"model": MODEL_NAME, "weights": weights_setting("gguf", 64), "split": "calibration"})
macs = model_macs(model)
ref = ev.reference()
print(f"W4A16 {ref:.4f} limit1% {1.01*ref:.4f}", flush=True)
for name, w in spec:
    w = {"qkv": w, "o": w, "gate_up": w, "down": w} if isinstance(w, int) else w
    t = time.perf_counter(); p = ev(w)
    print(f"{name:40s} ppl {p:.4f} ({100*(p/ref-1):+.2f} %) bops {relative_bops(w, macs):.4f} "
          f"{'cached' if ev.last.get('cached') else f'{time.perf_counter()-t:.0f} s'}", flush=True)
