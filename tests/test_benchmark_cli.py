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
