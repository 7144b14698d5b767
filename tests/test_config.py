import dataclasses

import pytest
import torch

from llm_compile.config import AndaConfig, LLMAccelConfig, OptionsError, SWAConfig, parse_options
from llm_compile.options_table import describe_options


def test_defaults_all_passes_off():
    cfg = parse_options(None)
    assert cfg == parse_options(LLMAccelConfig()) and cfg.swa is None and cfg.anda is None and cfg.offload is None
    assert cfg.inner == "inductor" and not cfg.canonicalize  # {} is stock Inductor (issue 17)


@pytest.mark.parametrize("options, want", [({}, False), ({"canonicalize": True}, True),
                                           ({"swa": True}, True), ({"kv_store": True}, True),
                                           ({"anda": True}, False), ({"swa": True, "canonicalize": None}, True)])
def test_canonicalize_only_when_a_pass_needs_it(options, want):
    """``canonicalize`` defaults to "when swa, kv_store or offload needs it": ``{}`` (and anda
    alone) leave attention to Inductor, so no custom-op call per layer costs decode speed."""
    from llm_compile.backend import passes_enabled

    cfg = parse_options(options)
    assert cfg.canonicalize is want
    assert passes_enabled(cfg) is (want or "anda" in options)


def test_sections_on_with_dict_or_true_and_frozen():
    cfg = parse_options({"swa": {"sparsity": 0.5}, "anda": True, "offload": False})
    assert cfg.swa == SWAConfig(sparsity=0.5) and cfg.anda == AndaConfig() and cfg.offload is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.swa.sparsity = 0.1


@pytest.mark.parametrize("opts, words", [
    ({"sparsity": 0.8}, ["unknown option", "'sparsity'", "valid keys", "'swa'", "'inner'"]),
    ({"swa": {"sparsty": 0.8}}, ["unknown option", "sparsty", "valid keys", "sparsity", "policy"]),
    ({"swa": {"sparsity": 1.5}}, ["swa.sparsity", "[0, 1)"]),
    ({"swa": {"policy": "random"}}, ["swa.policy", "alisa", "streaming", "h2o"]),
    ({"inner": "tvm"}, ["inner", "inductor", "eager"]),
    ({"anda": {"mantissa_bits": 0}}, ["mantissa_bits", "[1, 16]"]),
    ({"anda": {"mantissa_bits": {"qkv": 4}}}, ["mantissa_bits", "missing", "gate_up"]),
    ({"offload": {"workers": 0}}, ["offload.workers"]),
    ({"swa": "yes"}, ["swa='yes'", "dict"]),
    ({"swa": {"sparsity": 0.8}, "canonicalize": False}, ["canonicalize"]),
])
def test_bad_options_raise_clear_error(opts, words):
    with pytest.raises(OptionsError) as e:
        parse_options(opts)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_env_var_sets_debug_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMACCEL_DEBUG", str(tmp_path))
    assert parse_options({}).debug_dir == str(tmp_path)
    assert parse_options({"debug_dir": "x"}).debug_dir == "x"


def test_options_error_reaches_user_through_torch_compile():
    f = torch.compile(lambda x: x + 1, backend="llmaccel", options={"nope": 1})
    with pytest.raises(Exception) as e:
        f(torch.ones(2))
    assert "unknown option" in str(e.value) and "valid keys" in str(e.value)


def test_every_option_documented():
    rows = describe_options()
    keys = {r[0] for r in rows}
    assert {"swa.sparsity", "anda.mantissa_bits", "offload.workers", "inner", "debug_dir"} <= keys
    assert all(doc and kind for _, kind, _, doc in rows), [r for r in rows if not (r[1] and r[3])]
