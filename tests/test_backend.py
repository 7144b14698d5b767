"""The backend spine: AOT pipeline, inner compilers, pass manager rollback, debug dumps."""
import json
import subprocess
import sys

import pytest
import torch

import llm_compile.passes.pipeline as pipeline
from helpers import record_compiles, sites
from llm_compile.backend import COMPILED, llmaccel
from llm_compile.config import parse_options
from llm_compile.inductor_hook import PipelinePass
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
            out = torch.compile(m.forward, backend="llmaccel", options={"canonicalize": True})(ids).logits
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
        m.forward = torch.compile(m.forward, backend="llmaccel",
                                  options={"inner": "eager", "canonicalize": True, "debug_dir": str(tmp_path)})
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
    torch.compile(f, backend="llmaccel", options={"inner": "eager", "canonicalize": True,
                                                  "debug_dir": str(tmp_path)})(q, x, w)
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
              options={"inner": "eager", "canonicalize": True})(torch.randn(1, 2, 4, 8))
"""
    env = dict(**__import__("os").environ, TORCH_TRACE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    trace = "".join(p.read_text() for p in tmp_path.iterdir())
    assert "llmaccel_graph_000_canonicalize_attention" in trace and "llmaccel_graph_000_passes" in trace


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(Exception, match="mode='turbo' is not supported; use one of"):
        torch.compile(lambda x: x + 1, backend="llmaccel", mode="turbo")(torch.ones(2))
    with pytest.raises(Exception, match="'lite' is not supported"):  # it skips our post-grad hook
        torch.compile(lambda x: x + 1, backend="llmaccel", mode="lite")(torch.ones(2))
    with pytest.raises(Exception, match="mode"):
        parse_options({"mode": "fast"})
    with pytest.raises(Exception, match="disagree"):
        llmaccel(torch.fx.symbolic_trace(lambda x: x + 1), [torch.ones(2)], mode="max-autotune",
                 options={"mode": "reduce-overhead"})


def test_grad_mode_with_every_pass_off_keeps_autograd():
    """Training with every pass off compiles a plain autograd graph (tests/test_training_mode.py
    covers the refusal with passes on)."""
    lin = torch.nn.Linear(4, 4)
    f = torch.compile(lin, backend="llmaccel", options={"inner": "eager"})
    x = torch.randn(2, 4)
    out = f(x)
    torch.testing.assert_close(out, lin(x))
    assert out.requires_grad


class _SpyCompileFx:
    """Stands in for Inductor's ``compile_fx``: records its config patches, compiles nothing."""

    def __init__(self):
        self.patches = []

    def __call__(self, gm, example_inputs, config_patches=None, **kw):
        self.patches.append(dict(config_patches or {}))
        return self.compiled

    @staticmethod
    def compiled(*args):
        return "stock"


@pytest.fixture
def spy_compile_fx(monkeypatch):
    spy = _SpyCompileFx()
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", spy)
    return spy


def _traced():
    return torch.fx.symbolic_trace(lambda x, w: _f(x, w)), [torch.randn(4, 16), torch.randn(16, 8)]


@pytest.mark.parametrize("options", [{"canonicalize": False}, {}, None, {"inner": "inductor"}])
def test_passes_off_is_stock_inductor_without_hook_or_wrapper(spy_compile_fx, options):
    """``{}`` is stock Inductor too (issue 17): canonicalize runs only when a pass needs it."""
    gm, inputs = _traced()
    compiled = llmaccel(gm, inputs, options=options)
    assert compiled is _SpyCompileFx.compiled  # Inductor's callable itself: no per-call wrapper
    assert spy_compile_fx.patches == [{}]  # no post_grad hook, no config change
    assert COMPILED[-1]["passes"] == [] and COMPILED[-1]["inner"] == "inductor"


def test_passes_on_run_inside_inductor_as_post_grad_pre_pass(spy_compile_fx):
    gm, inputs = _traced()
    llmaccel(gm, inputs, options={"canonicalize": True})
    hook = spy_compile_fx.patches[0]["post_grad_custom_pre_pass"]
    assert isinstance(hook, PipelinePass)
    assert isinstance(hook.uuid(), str)


def test_pipeline_uuid_keys_the_config_and_refuses_caching_process_state():
    def uuid(opts):
        return PipelinePass(parse_options(opts), None).uuid()

    canon = {"canonicalize": True}
    assert uuid(canon) == uuid(canon) == uuid({**canon, "inner": "inductor"})
    assert len({uuid(canon), uuid({"canonicalize": True, "inner": "inductor", "anda": {"mantissa_bits": 6}}),
                uuid({"anda": {"mantissa_bits": 7}})}) == 3
    # graphs that bake a runtime handle (numbered per process) must never come from the disk cache
    for opts in ({"offload": {"workers": 1}}, {"swa": {"sparsity": 0.8}}, {"kv_store": True}):
        assert uuid(opts) is None, opts
    assert uuid({"debug_dir": "/tmp/x"}) is None  # a cache hit would skip the dump


@pytest.mark.parametrize("mode, key, value", [("reduce-overhead", "triton.cudagraphs", True),
                                              ("max-autotune", "max_autotune", True),
                                              ("default", "max_autotune", None)])
def test_modes_are_handed_to_inductor(spy_compile_fx, mode, key, value):
    gm, inputs = _traced()
    llmaccel(gm, inputs, options={"canonicalize": False}, mode=mode)
    llmaccel(gm, inputs, options={"canonicalize": False, "mode": mode})  # the same through options=
    assert spy_compile_fx.patches[0].get(key) == value and spy_compile_fx.patches[0] == spy_compile_fx.patches[1]


def test_cuda_graphs_off_for_stateful_passes():
    from llm_compile.backend import cacheable_outputs, inductor_config_patches

    for opts in ({"swa": {"sparsity": 0.8}}, {"kv_store": True}):
        assert inductor_config_patches("reduce-overhead", parse_options(opts))["triton.cudagraphs"] is False
        assert not cacheable_outputs(parse_options(opts))  # pipeline before Inductor (phantom outputs)
    assert inductor_config_patches("reduce-overhead", parse_options({}))["triton.cudagraphs"] is True


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_modes_compile_and_run_on_cpu(mode):
    f = lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x) * 2  # noqa: E731
    x = torch.randn(1, 2, 6, 8)
    with record_compiles() as rec:
        out = torch.compile(f, backend="llmaccel", options={"canonicalize": True, "mode": mode})(x)
    torch.testing.assert_close(out, f(x))
    assert rec[0]["inner"] == "inductor" and sites(rec[0]) == 1


def test_inductor_cache_hit_restores_pass_records(tmp_path, monkeypatch):
    """A second compile of the same graph is served by Inductor's caches (the pipeline does not
    run); COMPILED still reports its sites, read back from the record store."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    f = lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(-1)  # noqa: E731
    q = torch.randn(1, 2, 5, 8)
    recs = []
    for _ in range(2):
        torch._dynamo.reset()
        with record_compiles() as rec:
            torch.testing.assert_close(torch.compile(f, backend="llmaccel", options={"canonicalize": True})(q), f(q))
        recs += rec
    assert "cache" not in recs[0] and recs[1]["cache"] == "hit"
    assert sites(recs[0]) == sites(recs[1]) == 1
    assert recs[1]["passes"][0]["matched"] == recs[0]["passes"][0]["matched"]


def test_inductor_debug_dump_layout(tmp_path):
    m = build("llama", "eager", layers=2)  # eager attention: canonicalised in the post-grad graph too
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = m(ids).logits
        with record_compiles() as rec:
            out = torch.compile(m.forward, backend="llmaccel",
                                options={"canonicalize": True, "debug_dir": str(tmp_path)})(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert rec[0]["inner"] == "inductor" and sites(rec[0]) == 2
    d = next(tmp_path.glob("run_*/graph_*"))
    names = {p.name for p in d.iterdir()}
    assert {"00_dynamo.py", "01_aten.py", "02_canonicalize_attention.py", "02_canonicalize_attention.diff",
            "passes.json", "repro.py"} <= names
    assert "llmaccel.attention" in (d / "repro.py").read_text()


def test_hf_generate_compile_config_with_llmaccel():
    """transformers' generate(compile_config=...) calls torch.compile(backend=, mode=, options=);
    its default mode is "reduce-overhead", and torch.compile refuses mode= with options=, so
    options go with mode=None (and an Inductor mode, if any, inside options)."""
    from transformers import CompileConfig

    m = build("llama", "sdpa", layers=1)
    ids = torch.randint(0, 128, (1, 5))
    gen = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ref = m.generate(ids, **gen, disable_compile=True)
        for cc in (CompileConfig(backend="llmaccel"),  # mode="reduce-overhead", HF's default
                   CompileConfig(backend="llmaccel", mode=None,
                                 options={"mode": "max-autotune-no-cudagraphs", "inner": "eager"})):
            cc._compile_all_devices = True  # HF compiles on CPU only when asked
            torch._dynamo.reset()
            with record_compiles() as rec:
                out = m.generate(ids, **gen, compile_config=cc)
            assert out.tolist() == ref.tolist()
            assert rec, "generate did not compile with llmaccel"


def test_failing_pass_rolls_back_inside_inductor(monkeypatch):
    """The manager's rollback replaces the graph object; inside Inductor's post-grad hook the
    restored nodes must land in the graph Inductor holds (else it would lower the damaged one)."""
    spec = pipeline.PassSpec("canonicalize_attention", "canonicalize_attention", lambda c: True)
    monkeypatch.setattr(pipeline.PassSpec, "load", lambda self: _boom)
    monkeypatch.setattr("llm_compile.passes.manager.PIPELINE", [spec])
    monkeypatch.setattr("llm_compile.backend.PIPELINE", [spec])
    x, w = torch.randn(4, 16), torch.randn(16, 8)
    with record_compiles() as rec:
        out = torch.compile(_f, backend="llmaccel", options={"debug_dir": None})(x, w)
    torch.testing.assert_close(out, _f(x, w))
    assert "unsupported site xyz" in rec[0]["passes"][0]["error"] and rec[0]["inner"] == "inductor"


def test_record_compiles_sees_new_graphs_once_the_log_is_full(monkeypatch):
    """Regression (CI stop 20): with ``COMPILED`` full (late in a long suite) its length stays put,
    and counting from ``len(COMPILED)`` saw no new graph."""
    from collections import deque

    import llm_compile.backend as backend

    log = deque(({"graph_id": f"old_{i}", "passes": []} for i in range(256)), maxlen=256)
    monkeypatch.setattr(backend, "COMPILED", log)
    import helpers

    monkeypatch.setattr(helpers, "COMPILED", log)
    with record_compiles() as got:
        log.append({"graph_id": "new", "passes": []})
    assert [r["graph_id"] for r in got] == ["new"]
