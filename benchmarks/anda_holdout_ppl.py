"""Held-out perplexity of Anda tuples: the eager evaluator of ``anda_cli --holdout-tokens`` (same
cache setting, so a search's held-out evaluations are reused) on ``--tokens`` tokens of the
``holdout`` split (``llm_compile.eval.data``), for tuples the held-out searches did not measure.

    python benchmarks/anda_holdout_ppl.py --cache $C "uniform 7=7" "(7,6,7,7)=benchmarks/anda_tuples/kind_7_6_7_7.json"
"""
import argparse
import json

from llm_compile.anda_cli import MODEL_NAME, load_w4_model, parse_start, weights_setting
from llm_compile.anda_eval import EvalCache, Evaluator
from llm_compile.eval.data import load_tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", metavar="NAME=WIDTHS", help="a width, 'qkv,o,gate_up,down' or a tuple JSON")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--cache", default="anda_search_cache.json")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, tok = load_w4_model("gguf")
    ev = Evaluator(model, load_tokens(tok, "holdout", args.tokens), context=args.context, mode="eager",
                   cache=EvalCache(args.cache or None),
                   setting={"model": MODEL_NAME, "weights": weights_setting("gguf", 64), "split": "holdout"})
    ref = ev.reference()
    out = {"tokens": args.tokens, "context": args.context, "w4a16": ref, "rows": {}}
    print(f"W4A16 held-out ppl {ref:.4f} ({args.tokens} tokens)")
    for row in args.rows:
        name, spec = row.split("=", 1)
        v = ev(parse_start(spec)[0])
        out["rows"][name] = {"ppl": v, "vs_w4a16": v / ref - 1}
        print(f"{name}: held-out ppl {v:.4f} ({100 * (v / ref - 1):+.2f}%){' (cached)' if ev.last.get('cached') else ''}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
