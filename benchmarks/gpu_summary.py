"""Summary of a ``benchmarks/gpu_check.sh`` run: ``summary.json`` and ``summary.md`` in its folder.

    python benchmarks/gpu_summary.py OUT_DIR [--device NAME] [--import-how TEXT] [--total-s N]

Reads ``steps.jsonl`` (one line per step: rc, seconds), ``tests.xml`` (pytest's JUnit XML),
``swa.json`` (bench_swa.py), ``anda.json`` (bench_anda.py) and ``offload.json`` when present.
"""
from __future__ import annotations

import argparse
import datetime
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests_summary(xml: Path) -> dict | None:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def swa_rows(swa) -> list[str]:
    g = swa.get("gpu") if isinstance(swa, dict) else None
    if not isinstance(g, dict):
        return []
    return ["", f"### SWA decode attention, context {g['context']}, batch {g['batch']}, {g['dtype']} "
                f"(budget {g['budget']})", "",
            "| kernel | ms | vs dense SDPA |", "|---|---:|---:|"] + [
        f"| {name} | {g[key]:.4f} | {g['dense_sdpa_ms'] / g[key]:.2f}x |"
        for name, key in (("dense SDPA (whole cache)", "dense_sdpa_ms"), ("SWA Triton kernel", "swa_triton_ms"),
                          ("SWA torch gather", "swa_torch_gather_ms"), ("token selection (top-k)", "select_topk_ms"))
    ] + ["", f"max abs err Triton vs torch: {g['max_abs_err_triton_vs_torch']:.2e}"]


def policy_rows(swa) -> list[str]:
    r = swa.get("gpu_policies") if isinstance(swa, dict) else None
    if not isinstance(r, dict) or not r.get("rows"):
        return []
    names = list(dict.fromkeys(p for row in r["rows"] for p in [*row["ms"], *row["errors"]]))
    lines = ["", f"### One SWA decode site per policy at sparsity {r['sparsity']} (ms, median of {r['steps']} "
                 "steps; x = speed vs dense SDPA)", "",
             "| context | batch | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for row in r["rows"]:
        dense = row["ms"].get("dense")
        cells = []
        for n in names:
            ms = row["ms"].get(n)
            cells.append("FAILED" if ms is None else f"{ms:.3f}" + (f" ({dense / ms:.2f}x)" if dense and n != "dense" else ""))
        lines.append(f"| {row['context']} | {row['batch']} | " + " | ".join(cells) + " |")
    errors = [f"- context {row['context']}, {n}: {e}" for row in r["rows"] for n, e in row["errors"].items()]
    return lines + (["", "Failures:"] + errors if errors else [])


def anda_rows(anda) -> list[str]:
    if not isinstance(anda, dict) or not anda.get("results"):
        return []
    res = anda["results"]
    names = list(res[0]["times_ms"])
    lines = ["", "### Anda FP-INT matmul (ms; x = speed vs cuBLAS fp16)", "",
             "| rows | N | K | " + " | ".join(names) + " | max rel err |",
             "|---:|---:|---:|" + "---:|" * (len(names) + 1)]
    for r in res:
        t = r["times_ms"]
        base = t.get("float16_matmul")
        cells = []
        for n in names:
            v = t.get(n)
            cells.append("n/a" if v is None else (f"{v:.3f}" + (f" ({base / v:.2f}x)" if base and n != "float16_matmul" else "")))
        err = max(v for k, v in r["errors"].items() if k.startswith("anda"))
        lines.append(f"| {r['rows']} | {r['N']} | {r['K']} | " + " | ".join(cells) + f" | {err:.1e} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--device", default="?")
    ap.add_argument("--import-how", default="?")
    ap.add_argument("--total-s", type=int, default=None)
    a = ap.parse_args(argv)
    out = Path(a.out)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "steps.jsonl").exists() else []
    summary = {"gpu": True, "device": a.device, "date": datetime.date.today().isoformat(),
               "llm_compile_import": a.import_how, "total_s": a.total_s, "steps": steps,
               "tests": tests_summary(out / "tests.xml"), "swa": (_load(out / "swa.json") or {}).get("gpu"),
               "swa_policies": (_load(out / "swa.json") or {}).get("gpu_policies"),
               "anda": _load(out / "anda.json"), "offload": _load(out / "offload.json")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    md = [f"## GPU check: {a.device}, {summary['date']}", "",
          f"`bash benchmarks/gpu_check.sh` (total {a.total_s} s; llm_compile: {a.import_how})", "",
          "| step | exit | seconds | note |", "|---|---:|---:|---|"]
    for s in steps:
        rc = s["rc"]
        note = s.get("note") or ("timed out" if rc == 124 else ("ok" if rc == 0 else
                                 ("no tests selected" if s["step"] == "tests" and rc == 5 else "failed")))
        md.append(f"| {s['step']} | {rc} | {s['seconds']} | {note} |")
    t = summary["tests"]
    if t:
        md += ["", f"GPU tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"]
    md += swa_rows(_load(out / "swa.json")) + policy_rows(_load(out / "swa.json")) + anda_rows(summary["anda"])
    if summary["offload"]:
        md += ["", "### Offload over NCCL", "", "```", json.dumps(summary["offload"], indent=1)[:3000], "```"]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {out / 'summary.md'} and {out / 'summary.json'}")


if __name__ == "__main__":
    main()
