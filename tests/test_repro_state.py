"""The dump's repro.py of a graph rewritten by swa / kv_store runs in a fresh process: it builds the
per-sequence state the graph expects (failure 5 of issue 12: 'unknown runtime handle')."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, StaticCache

import model_zoo


def _dump(tmp_path, options, static=False):
    model = model_zoo.build("llama")
    model.forward = torch.compile(model.forward, backend="llmaccel",
                                  options={"inner": "eager", "debug_dir": str(tmp_path), **options})
    ids = torch.randint(0, model_zoo.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=32) if static else DynamicCache()
        out = model(ids, past_key_values=cache)
        for _ in range(2):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
    return sorted(tmp_path.glob("run_*/graph_*/repro.py"))


def _run(path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(path.parent / "inductor")}
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600,
                          cwd=path.parent, env=env)


@pytest.mark.parametrize("options, static", [
    pytest.param({"kv_store": True}, False, marks=pytest.mark.slow),
    ({"swa": {"sparsity": 0.5, "bucket": 4}, "kv_store": False}, False),
    pytest.param({"swa": {"sparsity": 0.5, "bucket": 4}}, True, marks=pytest.mark.slow),
], ids=["kv_store", "swa", "swa-static"])
def test_repro_of_a_stateful_decode_graph_runs_in_a_fresh_process(tmp_path, options, static):
    repros = _dump(tmp_path, options, static)
    assert len(repros) >= 2                       # prefill and decode graphs
    decode = repros[-1]
    text = decode.read_text()
    assert "run_repro(mod, load_args, [{" in text and "handle" not in text
    r = _run(decode)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stateful site(s) given a fresh sequence state" in r.stdout


def test_repro_of_an_offloaded_decode_graph_runs_in_a_fresh_process(tmp_path):
    """An offload graph names its worker pool (and the workers' SWA config) by a runtime handle:
    repro.py starts a pool of the same configuration under that handle, prefills the sequence its
    cache inputs name, runs, and shuts the pool down (before: 'unknown runtime handle')."""
    from llm_compile.runtime.offload.shared import shutdown_pools

    try:
        repros = _dump(tmp_path, {"offload": {"workers": 1, "timeout_s": 60},
                                  "swa": {"sparsity": 0.5, "bucket": 4, "selection": "kv_head"}})
    finally:
        shutdown_pools()
    assert len(repros) >= 2
    text = repros[-1].read_text()
    assert "offload_attention" in text and '"pool_cfg"' in text.replace("'", '"')
    r = _run(repros[-1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stateful site(s) given a fresh sequence state" in r.stdout
