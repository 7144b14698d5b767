"""Every option is type- and range-checked when ``options`` is parsed (issue 13, item 4), and the
SWA policies get their published defaults (item 5).

The table below has one row per option key; the key list is generated from the config dataclasses,
so a new option without a row fails ``test_every_option_has_a_case``."""
import dataclasses
import math
import pathlib

import pytest
import torch

from llm_compile.config import (LLMAccelConfig, OptionsError, POLICY_DEFAULTS, RULES, STAGE_NAMES,
                                SWAConfig, SECTIONS, parse_options)

NO_RANGE = object()
"""A bool option: every value of the right type is valid."""

CASES = {
    # key: (value of a wrong type, value of the right type out of range)
    "swa.sparsity": ("0.8", 1.0),
    "swa.recent_fraction": ("half", -0.1),
    "swa.score_window": (2.5, 0),
    "swa.selection": (1, "token"),
    "swa.sink_tokens": ("4", -1),
    "swa.policy": (None, "random"),
    "swa.bucket": (2.5, 0),
    "swa.kernel": (True, "cuda"),
    "swa.min_context": (512.0, -1),
    "swa.page_size": (16.0, 0),
    "swa.query_fraction": ("half", 1.5),
    "swa.seed": (1, "pooled"),
    "swa.scorer": (1, "exact"),
    "swa.sketch_bits": (2.0, 9),
    "swa.sketch_block": ("64", 1),
    "anda.mantissa_bits": (7.0, 17),
    "anda.group_size": (64.0, 32),
    "anda.kernel": (0, "cutlass"),
    "offload.workers": ("2", 0),
    "offload.timeout_s": ("5", -1.0),
    "offload.overlap": (1, NO_RANGE),
    "offload.transport": (None, "mpi"),
    "offload.init_method": (5, "10.0.0.1:29500"),
    "kv_store.reserve_tokens": (True, -1),
    "kv_store.growth": ("1.5", 1.0),
    "kv_tiers.device_budget": (1.5, 0),
    "kv_tiers.host_budget": ("1G", 0),
    "kv_tiers.mmap_dir": (5, ""),
    "kv_tiers.recent": (2.0, 0),
    "kv_tiers.max_context": ("8k", 1),
    "kv_tiers.recompute": (0.5, "always"),
    "kv_tiers.p1": (1.5, 0),
    "kv_tiers.p2": ("x", 0),
    "kv_tiers.alpha": ("0.5", 1.5),
    "kv_tiers.beta": ("0", -0.1),
    "kv_tiers.prefetch": (1, NO_RANGE),
    "kv_tiers.cost_cache_dir": (5, ""),
    "canonicalize": (1, NO_RANGE),
    "decode_matmul": ("yes", NO_RANGE),
    "inner": (["eager"], "tvm"),
    "mode": (1, "turbo"),
    "debug_dir": (5, ""),
    "debug_passes": (5, ["nonexistent"]),
}


def _all_keys():
    keys = []
    for f in dataclasses.fields(LLMAccelConfig):
        if f.name in SECTIONS:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(SECTIONS[f.name])]
        else:
            keys.append(f.name)
    return keys


def _options(key, value):
    if "." in key:
        section, name = key.split(".")
        return {section: {name: value}}
    return {key: value}


def test_every_option_has_a_case():
    assert sorted(CASES) == sorted(_all_keys())
    assert sorted(RULES) == sorted(_all_keys())


@pytest.mark.parametrize("key", sorted(CASES))
def test_wrong_type_is_one_clear_error(key):
    value = CASES[key][0]
    with pytest.raises(OptionsError) as e:
        parse_options(_options(key, value))
    msg = str(e.value)
    assert f"{key}={value!r}" in msg and type(value).__name__ in msg and "wrong type" in msg, msg
    assert "expected " + RULES[key].text in msg


@pytest.mark.parametrize("key", sorted(k for k in CASES if CASES[k][1] is not NO_RANGE))
def test_out_of_range_is_one_clear_error(key):
    value = CASES[key][1]
    with pytest.raises(OptionsError) as e:
        parse_options(_options(key, value))
    msg = str(e.value)
    assert f"{key}={value!r}" in msg and "out of range" in msg and "expected" in msg, msg


@pytest.mark.parametrize("options", ["swa", 5, ["swa"], {"swa": 1}, {"swa": 0}, {"anda": "yes"}])
def test_options_of_the_wrong_shape(options):
    with pytest.raises(OptionsError) as e:
        parse_options(options)
    assert "wrong type" in str(e.value) and "expected" in str(e.value)


def test_debug_passes_names_valid_stages():
    with pytest.raises(OptionsError) as e:
        parse_options({"debug_passes": ["nonexistent"]})
    assert "nonexistent" in str(e.value) and "sparse_window_attention" in str(e.value)
    assert parse_options({"debug_passes": "anda_lowering"}).debug_passes == ("anda_lowering",)


def test_stage_names_follow_the_pipeline():
    from llm_compile.passes.pipeline import PASS_NAMES

    assert list(STAGE_NAMES) == ["dynamo", "aten", *PASS_NAMES]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_refused(value):
    with pytest.raises(OptionsError):
        parse_options({"swa": {"sparsity": value}})
    with pytest.raises(OptionsError):
        parse_options({"offload": {"timeout_s": value}})


def test_valid_values_are_normalised():
    cfg = parse_options({"swa": {"sparsity": 0, "bucket": 16}, "offload": None, "kv_store": {"growth": 2},
                         "debug_dir": pathlib.Path("/tmp/x"), "debug_passes": ["aten"]})
    assert cfg.swa.sparsity == 0.0 and isinstance(cfg.swa.sparsity, float)
    assert cfg.kv_store.growth == 2.0 and isinstance(cfg.kv_store.growth, float)
    assert cfg.debug_dir == "/tmp/x" and cfg.debug_passes == ("aten",)
    o = parse_options({"offload": {"timeout_s": 5, "workers": 1, "init_method": "tcp://127.0.0.1:1"}})
    assert o.offload.timeout_s == 5.0 and isinstance(o.offload.timeout_s, float)


def test_a_config_object_is_checked_too():
    with pytest.raises(OptionsError) as e:
        parse_options(LLMAccelConfig(swa=SWAConfig(bucket=2.5)))
    assert "swa.bucket=2.5" in str(e.value)
    with pytest.raises(OptionsError):
        parse_options({"swa": SWAConfig(sparsity="0.8")})
    cfg = LLMAccelConfig(swa=SWAConfig(sparsity=0.5), canonicalize=True)
    assert parse_options(cfg) == cfg
    auto = parse_options(LLMAccelConfig(swa=SWAConfig(sparsity=0.5)))  # canonicalize=None: resolved
    assert auto == cfg and parse_options(auto) == auto


def test_env_debug_dir_is_checked(monkeypatch):
    monkeypatch.setenv("LLMACCEL_DEBUG", " ")
    with pytest.raises(OptionsError) as e:
        parse_options({})
    assert "debug_dir" in str(e.value)


def test_bad_option_reaches_the_user_through_torch_compile():
    f = torch.compile(lambda x: x + 1, backend="llmaccel", options={"swa": {"bucket": 2.5}})
    with pytest.raises(Exception) as e:
        f(torch.ones(2))
    assert "swa.bucket=2.5" in str(e.value)


# ---- item 5: per-policy defaults ---------------------------------------------------------------

@pytest.mark.parametrize("policy, sinks", [("streaming", 4), ("alisa", 0), ("h2o", 0)])
def test_policy_defaults_give_the_published_form(policy, sinks):
    assert POLICY_DEFAULTS[policy]["sink_tokens"] == sinks
    assert parse_options({"swa": {"policy": policy}}).swa.sink_tokens == sinks
    assert SWAConfig(policy=policy).sink_tokens == sinks


def test_explicit_sink_tokens_win():
    assert parse_options({"swa": {"policy": "streaming", "sink_tokens": 0}}).swa.sink_tokens == 0
    assert parse_options({"swa": {"policy": "alisa", "sink_tokens": 2}}).swa.sink_tokens == 2


def test_options_table_shows_policy_defaults():
    from llm_compile.options_table import options_table

    row = next(line for line in options_table().splitlines() if line.startswith("| `swa.sink_tokens`"))
    assert "streaming: 4" in row and "alisa: 0" in row and "h2o: 0" in row
