"""A reused ``debug_dir`` never mixes stage files of an earlier run with this one's (issue 13,
item 8): each run (process) dumps into its own ``run_<time>_<pid>`` folder, logged, with
``latest`` pointing at it."""
import collections
import itertools
import logging
import re

import torch

from llm_compile import backend, debug


def _sdpa(x):
    return torch.nn.functional.scaled_dot_product_attention(x, x, x) + 1


def _new_run(monkeypatch):
    """What a new process sees: graph ids from graph_000, no run folder yet (and its own record list,
    so the reused ids never reach the process-wide ``COMPILED`` other tests read)."""
    monkeypatch.setattr(backend, "_graph_ids", itertools.count())
    monkeypatch.setattr(backend, "COMPILED", collections.deque(maxlen=256))
    monkeypatch.setattr(debug, "_runs", {}, raising=False)
    torch._dynamo.reset()


def test_reused_debug_dir_gets_a_fresh_run_folder(tmp_path, monkeypatch, caplog):
    x = torch.randn(1, 2, 6, 8)
    _new_run(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="llm_compile.debug"):
        torch.compile(_sdpa, backend="llmaccel", options={"inner": "eager", "swa": True, "kv_store": False,
                                                          "debug_dir": str(tmp_path)})(x)
    first = [p for p in tmp_path.iterdir() if p.name.startswith("run_")]
    assert len(first) == 1 and re.fullmatch(r"run_\d{8}-\d{6}_\d+", first[0].name)
    assert any(str(first[0].resolve()) in r.getMessage() for r in caplog.records)  # logged where
    assert (first[0] / "graph_000" / "03_sparse_window_attention.py").exists()

    _new_run(monkeypatch)  # a second run, other options, same folder
    torch.compile(_sdpa, backend="llmaccel", options={"inner": "eager", "canonicalize": True, "debug_dir": str(tmp_path)})(x)
    runs = sorted(p for p in tmp_path.iterdir() if p.name.startswith("run_"))
    assert len(runs) == 2
    second = next(p for p in runs if p != first[0])
    names = {p.name for p in (second / "graph_000").iterdir()}
    assert "02_canonicalize_attention.py" in names
    assert not any("sparse_window" in n for n in names), names  # no stale stage of the first run
    assert (tmp_path / "latest").resolve() == second.resolve()
    torch._dynamo.reset()
