"""Anda end to end on SmolLM2-135M-Instruct: INT4 weights, Anda activations, generated Triton kernels.

    python examples/anda_smollm2.py                              # M = 7 everywhere, Triton kernels
    python examples/anda_smollm2.py --anda anda_tuple.json       # a tuple (or per-layer list) from the search CLI
    python examples/anda_smollm2.py --kernel reference --tokens 16

Quantizes every linear but ``lm_head`` to INT4 (group 64: SmolLM2's hidden size 576 is not a
multiple of 128), generates a greedy continuation with the W4A16 model (eager) and with
``torch.compile(model.forward, backend="llmaccel", options={"anda": ..., "inner": "eager"})``, and
prints both texts, how many tokens agree, how many linears the Anda pass lowered per compiled graph,
and the time per token. On CPU the generated Triton kernels run in the Triton interpreter (slow: it
executes every kernel program in Python/NumPy), hence the few tokens by default.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: kernels interpreted on CPU

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from llm_compile.anda_cli import WEIGHTS, load_w4_model  # noqa: E402
from llm_compile.anda_eval import lowered_count  # noqa: E402
from llm_compile.backend import COMPILED  # noqa: E402
from llm_compile.eval.metrics import greedy_generate  # noqa: E402

PROMPT = "In the beginning God created the heavens and the earth. The earth was"


def anda_option(value: str, kernel: str) -> dict:
    """``--anda 7`` or ``--anda tuple.json`` -> the ``options["anda"]`` dict."""
    if value.isdigit():
        section = {"mantissa_bits": int(value)}
    else:
        with open(value) as f:
            section = json.load(f)
    return dict(section, kernel=kernel)


def run(model, ids, n):
    t0 = time.perf_counter()
    out = greedy_generate(model, ids, n)
    return out, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anda", default="7", help="mantissa width for every kind, or a tuple JSON file")
    ap.add_argument("--kernel", choices=("triton", "reference"), default="triton")
    ap.add_argument("--tokens", type=int, default=8, help="new tokens (greedy)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--weights", choices=WEIGHTS, default="requant",
                    help="INT4 weights: 'requant' (symmetric RTN, group 64; the default, as documented) "
                         "or 'gguf' (the shipped Q4_1 file's own integers)")
    args = ap.parse_args(argv)

    model, tok = load_w4_model(args.weights, bits=4, group_size=64)
    ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    ref, t_ref = run(model, ids, args.tokens)

    options = {"anda": anda_option(args.anda, args.kernel), "inner": "eager"}
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="llmaccel", options=options)
    start = len(COMPILED)
    out, t_anda = run(model, ids, args.tokens)
    del model.forward
    records = list(COMPILED)[start:]
    stats = [next(p for p in r["passes"] if p["pass"] == "anda_lowering") for r in records]
    kernels = sorted({s["stats"]["kernel"] for s in stats})

    same = int((out[:len(ref)] == ref[:len(out)]).sum())
    print(f"prompt: {args.prompt!r}")
    print(f"W4A16 eager : {tok.decode(ref)!r}  ({t_ref / len(ref):.2f} s/token)")
    print(f"Anda {json.dumps(options['anda'])}: {tok.decode(out)!r}  "
          f"({t_anda / len(out):.1f} s/token incl. compiling {len(records)} graphs)")
    print(f"tokens agreeing: {same}/{len(ref)}; linears lowered per graph: "
          f"{[len(s['matched']) for s in stats]} of {len(model.llmaccel_quantized)} quantized; kernel {kernels}")
    return {"ref": ref.tolist(), "anda": out.tolist(), "same": same, "lowered": lowered_count(records),
            "graphs": len(records), "seconds": t_anda}


if __name__ == "__main__":
    main()
