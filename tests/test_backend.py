"""The backend spine: AOT pipeline, inner compilers, pass manager rollback, debug dumps."""
import json
import subprocess
import sys

import pytest
import torch

import llm_compile.passes.pipeline as pipeline
from helpers import record_compiles, sites
from model_zoo import build


def _f(x, w):
    return torch.nn.functional.gelu(x @ w).sum(-1)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_passes_off_equals_eager(inner):
    x, w = torch.randn(4, 16), torch.randn(16, 8)
    opts = {"inner": inner, "canonicalize": False}
    out = torch.compile(_f, backend="llmaccel", options=opts)(x, w)
    torch.testing.assert_close(out, _f(x, w))


def test_llama_logits_inductor_equal_eager():
    m = build("llama", "sdpa")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = m(ids).logits
        with record_compiles() as rec:
            out = torch.compile(m.forward, backend="llmaccel")(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(rec) == 1 and sites(rec[0]) == 2


def _boom(gm, config, ctx):
    for n in list(gm.graph.nodes):  # damage the graph, then fail: the manager must roll back
        if n.op == "call_function":
            n.target = torch.ops.aten.neg.default
    raise RuntimeError("unsupported site xyz")


def test_failing_pass_rolls_back_and_is_reported(monkeypatch, tmp_path):
    spec = pipeline.PassSpec("canonicalize_attention", "canonicalize_attention", lambda c: True)
    monkeypatch.setattr(pipeline.PassSpec, "load", lambda self: _boom)
    monkeypatch.setattr("llm_compile.passes.manager.PIPELINE", [spec])
    x, w = torch.randn(4, 16), torch.randn(16, 8)
    out = torch.compile(_f, backend="llmaccel", options={"inner": "eager", "debug_dir": str(tmp_path)})(x, w)
    torch.testing.assert_close(out, _f(x, w))
    rec = json.loads(next(tmp_path.glob("run_*/graph_*/passes.json")).read_text())[0]
    assert "unsupported site xyz" in rec["error"] and rec["changed"] is False
    assert "rolled back" in rec["skipped"][0]["reason"]


def test_pass_must_return_pass_result(monkeypatch):
    spec = pipeline.PassSpec("canonicalize_attention", "canonicalize_attention", lambda c: True)
    monkeypatch.setattr(pipeline.PassSpec, "load", lambda self: (lambda gm, c, ctx: True))
    monkeypatch.setattr("llm_compile.passes.manager.PIPELINE", [spec])
    with record_compiles() as rec:
        torch.compile(_f, backend="llmaccel", options={"inner": "eager"})(torch.randn(2, 16), torch.randn(16, 3))
    assert "PassResult" in rec[0]["passes"][0]["error"]


def test_debug_dump_layout(tmp_path):
    m = build("llama", "sdpa")
    with torch.no_grad():
        m.forward = torch.compile(m.forward, backend="llmaccel", options={"inner": "eager", "debug_dir": str(tmp_path)})
        m.generate(torch.randint(0, 128, (1, 5)), max_new_tokens=3, do_sample=False)
    graphs = sorted(tmp_path.glob("run_*/graph_*"))
    assert len(graphs) >= 2
    d = graphs[1]  # first decode graph
    names = {p.name for p in d.iterdir()}
    assert {"00_dynamo.py", "01_aten.py", "02_canonicalize_attention.py", "02_canonicalize_attention.diff",
            "passes.json", "repro.py"} <= names
    diff = (d / "02_canonicalize_attention.diff").read_text()
    assert "+" in diff and "llmaccel.attention.default" in diff and "_scaled_dot_product" in diff
    rec = json.loads((d / "passes.json").read_text())[0]
    assert rec["pass"] == "canonicalize_attention" and rec["nodes_before"] > 0 and rec["time_s"] >= 0
    assert rec["op_count_delta"]["llmaccel.attention.default"] == 2
    assert [s["kv_cache_append"] for s in rec["matched"]] == [True, True]
    assert "llmaccel.attention" in (d / "02_canonicalize_attention.py").read_text()


def test_repro_runs(tmp_path):
    x, w = torch.randn(4, 16), torch.randn(16, 8)
    q = torch.randn(1, 2, 5, 8)
    f = lambda q, x, w: (torch.nn.functional.scaled_dot_product_attention(q, q, q), _f(x, w))  # noqa: E731
    torch.compile(f, backend="llmaccel", options={"inner": "eager", "debug_dir": str(tmp_path)})(q, x, w)
    repro = next(tmp_path.glob("run_*/graph_*/repro.py"))
    assert "llmaccel.attention" in repro.read_text()
    r = subprocess.run([sys.executable, str(repro)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_env_var_dump_and_pass_filter(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMACCEL_DEBUG", str(tmp_path))
    x, w = torch.randn(4, 16), torch.randn(16, 8)
    torch.compile(_f, backend="llmaccel", options={"inner": "eager", "debug_passes": ["anda_lowering"]})(x, w)
    d = next(tmp_path.glob("run_*/graph_*"))
    names = {p.name for p in d.iterdir()}
    assert "00_dynamo.py" in names and "01_aten.py" in names
    assert "02_canonicalize_attention.py" not in names
    assert json.loads((d / "passes.json").read_text()) == []


def test_stages_mirrored_to_torch_logging(tmp_path):
    code = """
import torch
torch.compile(lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x), backend="llmaccel",
              options={"inner": "eager"})(torch.randn(1, 2, 4, 8))
"""
    env = dict(**__import__("os").environ, TORCH_TRACE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    trace = "".join(p.read_text() for p in tmp_path.iterdir())
    assert "llmaccel_graph_000_canonicalize_attention" in trace and "llmaccel_graph_000_passes" in trace


def test_unsupported_mode_is_a_clear_error():
    with pytest.raises(Exception, match="mode"):
        torch.compile(lambda x: x + 1, backend="llmaccel", mode="max-autotune")(torch.ones(2))


def test_grad_mode_with_every_pass_off_keeps_autograd():
    """Training with every pass off compiles a plain autograd graph (tests/test_training_mode.py
    covers the refusal with passes on)."""
    lin = torch.nn.Linear(4, 4)
    f = torch.compile(lin, backend="llmaccel", options={"inner": "eager"})
    x = torch.randn(2, 4)
    out = f(x)
    torch.testing.assert_close(out, lin(x))
    assert out.requires_grad
