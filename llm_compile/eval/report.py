"""Tables (markdown) and plots (matplotlib, Agg) of evaluation results.

Input everywhere is the list of per-config result dicts produced by
:func:`llm_compile.eval.runner.run_configs`; each has a ``row`` of headline numbers.
"""
from __future__ import annotations

import json
import logging
import math
import os

from .runner import finite

logger = logging.getLogger(__name__)

COLUMNS = (
    ("ppl", "ppl", "{:.3f}"),
    ("stream_ppl", "stream ppl", "{:.3f}"),
    ("decode_ms", "decode ms/tok", "{:.1f}"),
    ("passkey", "passkey acc", "{:.2f}"),
    ("agree", "agreement", "{:.3f}"),
)
"""(row key, column title, format) of the table and plots, in order."""

PLOTTED = ("ppl", "stream_ppl", "passkey", "agree")
SHARES = ("passkey", "agree")
"""Metrics in [0, 1] (plotted on a fixed 0..1 axis)."""


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def markdown_table(results: list[dict]) -> str:
    """One row per config, one column per measured headline number, plus the number of graphs
    Dynamo compiled, wall time (compilation included) and status."""
    present = [c for c in COLUMNS if any(c[0] in r["row"] for r in results)]
    head = ["config", *[c[1] for c in present], "graphs", "time s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2)
                                                           + ["---"]) + "|"]
    for r in results:
        cells = [r["name"], *[_cell(r["row"].get(k), f) for k, _, f in present],
                 str(r.get("graphs", "-")), f"{r['seconds']:.0f}", "ok" if not r.get("error") else "FAILED: " + r["error"][:80]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def options_legend(results: list[dict]) -> str:
    """``name: options-json`` lines (what each table row ran)."""
    return "\n".join(f"- `{r['name']}`: `{json.dumps(r['options'])}`" for r in results)


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(results: list[dict], key: str, values: list, path: str,
               reference: dict | None = None) -> str:
    """Plot each headline metric against the swept option ``key``; write a PNG to ``path``.

    ``results`` are the sweep's configs, in the order of ``values``; ``reference`` (e.g. the eager
    config's result) is drawn as a dashed horizontal line. Failed configs are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [c for c in COLUMNS if c[0] in PLOTTED and any(c[0] in r["row"] for r in results)]
    if not present:
        raise ValueError("nothing to plot: no metric was measured")
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.4), squeeze=False)
    numeric = _numeric(values)
    xs = values if numeric else list(range(len(values)))
    for ax, (k, title, _) in zip(axes[0], present):
        pts = [(x, r["row"].get(k)) for x, r in zip(xs, results)
               if not r.get("error") and finite(r["row"].get(k))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        if reference is not None and finite(reference["row"].get(k)):
            ax.axhline(reference["row"][k], ls="--", color="gray", label=reference["name"])
            ax.legend(fontsize=8)
        if k in SHARES:
            ax.set_ylim(-0.03, 1.03)
        if not numeric:
            ax.set_xticks(xs, [str(v) for v in values], rotation=30, fontsize=8)
        ax.set_xlabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path


def plot_configs(results: list[dict], path: str) -> str:
    """Bar chart of each headline metric over named configs; write a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [c for c in COLUMNS if c[0] in PLOTTED and any(c[0] in r["row"] for r in results)]
    if not present:
        raise ValueError("nothing to plot: no metric was measured")
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.6), squeeze=False)
    names = [r["name"] for r in results]
    for ax, (k, title, _) in zip(axes[0], present):
        vals = [r["row"].get(k) if finite(r["row"].get(k)) else 0.0 for r in results]
        ax.bar(range(len(names)), vals)
        if k in SHARES:
            ax.set_ylim(0, 1.03)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path
