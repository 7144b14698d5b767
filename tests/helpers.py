"""Small helpers shared by tests: count what the llmaccel backend compiled."""
from __future__ import annotations

import contextlib

from llm_compile.backend import COMPILED


@contextlib.contextmanager
def record_compiles():
    """Yields a list that fills with the ``COMPILED`` records made inside the block."""
    start = len(COMPILED)
    first_id = COMPILED[-1]["graph_id"] if COMPILED else None
    out: list[dict] = []
    yield out
    new = list(COMPILED)
    if first_id is not None:
        ids = [r["graph_id"] for r in new]
        new = new[ids.index(first_id) + 1:] if first_id in ids else new[start:]
    out.extend(new)


def pass_record(compiled: dict, name: str) -> dict | None:
    return next((r for r in compiled["passes"] if r["pass"] == name), None)


def sites(compiled: dict) -> int:
    rec = pass_record(compiled, "canonicalize_attention")
    return 0 if rec is None else rec["stats"]["sites"]


def op_delta(compiled: dict, name: str, op: str) -> int:
    rec = pass_record(compiled, name)
    return 0 if rec is None else rec["op_count_delta"].get(op, 0)
