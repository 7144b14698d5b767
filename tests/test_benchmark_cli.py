"""Argument handling of the benchmark scripts (they run for hours; a typo must fail at once)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_swa_accuracy_configs_and_variants():
    m = _load("swa_accuracy")
    label, extra = m._variant('alisa-kvhead={"selection": "kv_head", "sink_tokens": 4}')
    cfgs = dict(m.configs((0.5, 0.8), ("alisa", "streaming"), "eager", 4, variants={label: extra}))
    assert list(cfgs) == ["dense", "alisa@0.5", "alisa@0.8", "streaming@0.5", "streaming@0.8",
                          "alisa-kvhead@0.5", "alisa-kvhead@0.8"]
    assert cfgs["streaming@0.8"]["swa"] == {"policy": "streaming", "sparsity": 0.8, "sink_tokens": 4}
    assert cfgs["alisa-kvhead@0.8"]["swa"] == {"selection": "kv_head", "sink_tokens": 4, "sparsity": 0.8}
    # every generated config is a valid option set for the backend
    from llm_compile.config import parse_options
    for opts in cfgs.values():
        parse_options(opts)


@pytest.mark.parametrize("spec", ["nolabel", "a@b={}", 'x={"sparsity": 0.5}', "x=[1]", "x={bad"])
def test_swa_accuracy_rejects_bad_variant(spec):
    m = _load("swa_accuracy")
    with pytest.raises(Exception, match="--variant"):
        m._variant(spec)


def test_swa_accuracy_unknown_only_fails_before_loading_the_model(capsys):
    m = _load("swa_accuracy")
    with pytest.raises(SystemExit):
        m.main(["--only", "dense,alisa@0.7", "--sparsities", "0.8"])
    assert "unknown configs ['alisa@0.7']" in capsys.readouterr().err


def test_gpu_check_without_gpu_exits_0_and_says_so(tmp_path):
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpu_check.sh would run the whole check")
    env = dict(os.environ, OUT=str(tmp_path / "gpu"), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU" in r.stdout
    assert '"gpu": false' in (tmp_path / "gpu" / "summary.json").read_text()


def test_gpu_summary_tables(tmp_path):
    import json

    (tmp_path / "steps.jsonl").write_text(
        '{"step": "tests", "rc": 0, "seconds": 40, "timeout_s": 180}\n'
        '{"step": "anda", "rc": 124, "seconds": 120, "timeout_s": 120}\n'
        '{"step": "offload", "rc": -1, "seconds": 0, "timeout_s": 0, "note": "needs 2 GPUs"}\n')
    (tmp_path / "tests.xml").write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/>'
                                        '</testsuites>')
    (tmp_path / "swa.json").write_text(json.dumps({"gpu": {
        "context": 32768, "batch": 4, "dtype": "fp16", "budget": "b", "dense_sdpa_ms": 2.0, "swa_triton_ms": 0.5,
        "swa_torch_gather_ms": 1.0, "select_topk_ms": 0.1, "max_abs_err_triton_vs_torch": 1e-3},
        "gpu_policies": {"sparsity": 0.8, "steps": 20, "rows": [
            {"context": 8192, "batch": 4, "ms": {"dense": 0.3, "alisa": 0.1, "recall": 0.15},
             "errors": {"quest": "RuntimeError: boom"}}]}}))
    (tmp_path / "anda.json").write_text(json.dumps({"results": [{
        "rows": 1, "N": 4096, "K": 4096, "times_ms": {"float16_matmul": 0.02, "anda_m7_w4": 0.01,
                                                      "aten_int4pack_mm": None},
        "errors": {"anda_m7_w4": 1e-4}}]}))
    _load("gpu_summary").main([str(tmp_path), "--device", "1 x H200", "--total-s", "300"])
    md = (tmp_path / "summary.md").read_text()
    assert "| anda | 124 | 120 | timed out |" in md and "| offload | -1 | 0 | needs 2 GPUs |" in md
    assert "5 run, 1 failed" in md and "| SWA Triton kernel | 0.5000 | 4.00x |" in md
    assert "| 1 | 4096 | 4096 | 0.020 | 0.010 (2.00x) | n/a | 1.0e-04 |" in md
    assert "| 8192 | 4 | 0.300 | 0.100 (3.00x) | 0.150 (2.00x) | FAILED |" in md
    assert "- context 8192, quest: RuntimeError: boom" in md
    assert json.loads((tmp_path / "summary.json").read_text())["tests"]["failures"] == 1


def test_policy_bench_times_every_policy_and_reports_failures():
    """The GPU one-site step bench of bench_swa.py (issue 15's speed target on a lent GPU) runs on
    any device: here on the CPU at a small context, every policy timed, a bad one reported."""
    import argparse
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        m = _load("swa_site_bench")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    args = argparse.Namespace(batch=2, sparsity=0.8, bucket=64, gpu_steps=3, gpu_policy_contexts=[320],
                              gpu_policies=["alisa", "quest", "recall", "no-such-policy"])
    r = m.policy_bench(args, device="cpu", dtype=torch.float32)
    (row,) = r["rows"]
    assert set(row["ms"]) == {"dense", "alisa", "quest", "recall"} and all(v > 0 for v in row["ms"].values())
    assert list(row["errors"]) == ["no-such-policy"] and "no-such-policy" in row["errors"]["no-such-policy"]
    assert set(row["budget"]) == {"alisa", "quest", "recall"}


def test_bench_swa_rejects_an_unknown_gpu_policy(capsys):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        m = _load("bench_swa")
        with pytest.raises(SystemExit):
            m.main(["--gpu-policies", "alisa,recal"])
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert "--gpu-policies: unknown ['recal']" in capsys.readouterr().err


def test_gpu_check_import_shim_maps_the_package_dirs(tmp_path):
    """Where llm_compile is not installed and pip cannot install it, gpu_check.sh's shim makes
    llm_compile.passes / llm_compile.codegen (package-dir mapped) and backend="llmaccel" resolve.
    Uses the venv's base interpreter (torch, but no llm_compile) as the GPU machine's python."""
    import os
    import subprocess
    import sys

    base = getattr(sys, "_base_executable", None)
    probe = "import torch, importlib.util as u; import sys; sys.exit(0 if u.find_spec('llm_compile') is None else 1)"
    if not base or base == sys.executable or subprocess.run([base, "-c", probe], cwd=tmp_path).returncode:
        pytest.skip("needs a base interpreter with torch and without llm_compile")
    env = dict(os.environ, OUT=str(tmp_path / "gpu"), PYTHON=base, GPU_CHECK_NO_PIP="1")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--setup-only"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "import shim" in r.stdout, r.stdout + r.stderr
    pythonpath = r.stdout.split("PYTHONPATH=")[1].strip()
    code = ("import importlib.metadata as m, llm_compile.passes.pipeline as p, llm_compile.codegen as c; "
            "print(p.__file__, c.__file__); "
            "print([e.value for e in m.entry_points(group='torch_dynamo_backends') if e.name == 'llmaccel'])")
    r = subprocess.run([base, "-c", code], env=dict(os.environ, PYTHONPATH=pythonpath), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(ROOT / "passes" / "pipeline.py") in r.stdout and "llm_compile.backend:llmaccel" in r.stdout


def test_bench_backend_args_and_table(capsys):
    m = _load("bench_backend")
    with pytest.raises(SystemExit):
        m.parse_args(["--configs", "eager,turbo"])
    assert "unknown configs ['turbo']" in capsys.readouterr().err
    args = m.parse_args(["--configs", "eager,inductor,llmaccel-off", "--repeats", "3"])
    assert m.CONFIGS["inductor"] == ("inductor", {}) and m.CONFIGS["llmaccel-off"] == ("llmaccel", {})

    def row(name, dec, pre, cold, warm):
        backend, opts = m.CONFIGS[name]
        base_dec, base_pre = [10.0, 12.0, 11.0], [100.0, 90.0, 95.0]
        r = {"config": name, "backend": backend, "options": opts, "compile_cold_s": cold, "compile_warm_s": warm,
             "decode_tok_s": m._stats(dec), "prefill_tok_s": m._stats(pre)}
        r["decode_tok_s_vs_inductor"] = m._stats([a / b for a, b in zip(dec, base_dec)])
        r["prefill_tok_s_vs_inductor"] = m._stats([a / b for a, b in zip(pre, base_pre)])
        return r

    result = {"args": vars(args), "rows": [row("eager", [5.0, 6.0, 5.5], [50.0, 45.0, 47.0], None, None),
                                           row("inductor", [10.0, 12.0, 11.0], [100.0, 90.0, 95.0], 40.0, 20.0),
                                           row("llmaccel-off", [9.9, 12.0, 11.55], [100.0, 90.0, 95.0], 44.0, 22.0)]}
    text = m.table(result)
    assert "| llmaccel-off `{}` | 11.55 [9.90-12.00] | 1.00 [0.99-1.05]x |" in text
    assert "| 44.0 | 22.0 | 1.10x | 1.10x | -/33 |" in text
    assert "| eager | 5.50 [5.00-6.00] | 0.50 [0.50-0.50]x |" in text


@pytest.mark.slow  # minutes on 2 cores: run with -m slow (CI keeps the suite under ~15 min)
def test_bench_kv_tiers_runs_at_a_tiny_size(tmp_path):
    """Every config gives a row (or its error), the targets and the plan are reported, JSON + PNG."""
    import json

    m = _load("bench_kv_tiers")
    out = m.main(["--context", "40", "--layers", "1", "--steps", "1", "--warmup", "1", "--batches", "1,2",
                  "--budget-mib", "1", "--recent", "8", "--json", str(tmp_path / "r.json"),
                  "--png", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").stat().st_size > 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["partial"] is False and set(data["configs"]) >= {"dense_device", "host_all", "swa_tiers"}
    c = out["configs"]["swa_tiers"][0]
    assert c["batch"] == 2 and c["tokens_per_s"] > 0 and c["plan"]["beta"] == 0
    assert "batch_c_over_a" in out["targets"] and "tok_s_c_over_b" in out["targets"]


def test_kvpress_continuation_configs_table_and_unknown_only(tmp_path, capsys):
    m = _load("kvpress_continuation")  # runs in its own venv; must import without kvpress
    cfgs = m.configs((0.5, 0.8), ("SnapKVPress", "ObservedAttentionPress"))
    assert [c[0] for c in cfgs] == ["dense-sdpa", "dense-eager", "SnapKVPress@0.5", "SnapKVPress@0.8",
                                    "ObservedAttentionPress@0.5", "ObservedAttentionPress@0.8"]
    res = [{"name": "dense-sdpa", "ppl": 10.0}, {"name": "dense-eager", "ppl": 10.1},
           {"name": "SnapKVPress@0.8", "press": "SnapKVPress", "ppl": 11.0},
           {"name": "ObservedAttentionPress@0.8", "press": "ObservedAttentionPress", "ppl": 11.11}]
    t = m.table(res, (0.5, 0.8), ["SnapKVPress", "ObservedAttentionPress"])
    assert "| SnapKVPress | - | 11.000 (+10.0 %) |" in t
    assert "| ObservedAttentionPress | - | 11.110 (+10.0 %) |" in t  # vs the eager dense
    path = tmp_path / "kv.json"
    path.write_text(__import__("json").dumps({"results": res}))
    s = _load("swa_continuation")
    rows, pts = s.kvpress_rows(str(path), (0.5, 0.8))
    assert "| kvpress SnapKVPress | - | 11.000 (+10.0 %) |" in rows
    assert pts["SnapKVPress"] == [(0.8, pytest.approx(10.0))]
    with pytest.raises(SystemExit):
        m.main(["--only", "dense-sdpa,SnapKVPress@0.7", "--ids", str(path.with_name("missing.json"))])


def test_swa_continuation_ids_only_and_unknown_only(capsys):
    s = _load("swa_continuation")
    with pytest.raises(SystemExit):
        s.main(["--only", "dense,recall@0.7", "--sparsities", "0.8"])
    assert "unknown configs ['recall@0.7']" in capsys.readouterr().err


def test_swa_accuracy_merges_passkey_only_runs(tmp_path, capsys):
    """--merge of passkey-only JSON (no stream metric): the table, the found counts and a plot
    (the plot used to fail on the missing stream_ppl)."""
    pytest.importorskip("matplotlib")
    m = _load("swa_accuracy")
    runs = ROOT / "benchmarks" / "continuation"
    png = tmp_path / "grid.png"
    m.main(["--merge", str(runs / "passkey_grid_dense_alisa.json"), str(runs / "passkey_grid_h2o08.json"),
            "--plot", str(png)])
    out = capsys.readouterr().out
    assert "| dense | 1.00 |" in out and "| h2o | 0.00 |" in out
    assert "alisa@0.8: found 3 / 15" in out
    assert png.stat().st_size > 0
