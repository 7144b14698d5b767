"""Small helpers shared by tests: count what the llmaccel backend compiled; a compiled small Llama
and prompts for it."""
from __future__ import annotations

import contextlib

import torch

import model_zoo
from llm_compile.backend import COMPILED


@contextlib.contextmanager
def record_compiles():
    """Yields a list that fills with the ``COMPILED`` records made inside the block."""
    # COMPILED is bounded: once full its length stays put, so no index works; graph ids are unique
    before = {r["graph_id"] for r in COMPILED}
    out: list[dict] = []
    yield out
    out.extend(r for r in COMPILED if r["graph_id"] not in before)


def pass_record(compiled: dict, name: str) -> dict | None:
    return next((r for r in compiled["passes"] if r["pass"] == name), None)


def sites(compiled: dict) -> int:
    rec = pass_record(compiled, "canonicalize_attention")
    return 0 if rec is None else rec["stats"]["sites"]


def op_delta(compiled: dict, name: str, op: str) -> int:
    rec = pass_record(compiled, name)
    return 0 if rec is None else rec["op_count_delta"].get(op, 0)


def compiled_llama(options: dict):
    """model_zoo's 2-layer Llama (seed 0) with its forward compiled by llmaccel under ``options``."""
    m = model_zoo.build("llama", layers=2, seed=0)
    m.forward = torch.compile(m.forward, backend="llmaccel", options=options)
    return m


def prompt_ids(n: int = 60, batch: int = 2):
    """``batch`` random prompts of ``n`` token ids (seed 0) in model_zoo's vocabulary."""
    return torch.randint(0, model_zoo.VOCAB, (batch, n), generator=torch.Generator().manual_seed(0))
