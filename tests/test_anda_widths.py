"""``anda.mantissa_bits``: int, kind dict, or one entry per decoder layer (issue 16, item 4)."""
import pytest

from llm_compile.anda_widths import bits_for, describe, layer_index, uniform_kind_dict
from llm_compile.config import AndaConfig, OptionsError, parse_options

D7 = {"qkv": 7, "o": 10, "gate_up": 7, "down": 7}
D6 = {"qkv": 6, "o": 9, "gate_up": 7, "down": 8}


def _anda(value):
    return parse_options({"anda": {"mantissa_bits": value}}).anda


def test_per_layer_list_parsed_normalised_and_looked_up():
    a = _anda([D7, 5, D6])
    assert a.mantissa_bits == (D7, 5, D6) and isinstance(a.mantissa_bits, tuple)
    assert a.bits_for("o", 0) == 10 and a.bits_for("gate_up", 1) == 5 and a.bits_for("down", 2) == 8
    assert _anda((D7, D7)).mantissa_bits == (D7, D7)                     # a tuple is accepted too
    # the parsed config parses again to itself (options given as an AndaConfig)
    assert parse_options({"anda": a}).anda == a


def test_old_forms_unchanged():
    assert _anda(7).bits_for("qkv") == 7 and _anda(7).bits_for("down", 29) == 7
    a = _anda(dict(D6))
    assert a.mantissa_bits == D6 and a.bits_for("o") == 9 and a.bits_for("o", 3) == 9
    assert AndaConfig().bits_for("qkv", 0) == 7


@pytest.mark.parametrize("value, words", [
    ([7, 17], ["mantissa_bits[1]", "layer 1", "out of range", "[1, 16]"]),
    ([D7, {"qkv": 7, "o": 7, "gate_up": 7}], ["mantissa_bits[1]", "missing ['down']"]),
    ([D7, dict(D7, ffn=3)], ["mantissa_bits[1]", "unknown ['ffn']"]),
    ([], ["wrong type", "one such int or dict per decoder layer"]),
    ([7, 7.5], ["wrong type"]),
    ([[7, 7, 7, 7]], ["wrong type"]),                # no nested per-kind lists: a dict names the kinds
    ([True, 7], ["wrong type"]),
    ([{"qkv": "7", "o": 7, "gate_up": 7, "down": 7}], ["wrong type"]),
    ({"qkv": 0, "o": 7, "gate_up": 7, "down": 7}, ["out of range"]),
])
def test_malformed_values_rejected_at_parse_time(value, words):
    with pytest.raises(OptionsError) as e:
        _anda(value)
    msg = str(e.value)
    assert "anda.mantissa_bits" in msg and all(w in msg for w in words), msg


def test_lookup_errors_and_layer_index():
    a = _anda([D7, D6])
    with pytest.raises(LookupError, match="lists 2 layers .*: none for layer 2"):
        a.bits_for("qkv", 2)
    with pytest.raises(LookupError, match="no layer index"):
        a.bits_for("qkv", None)
    assert layer_index("model.layers.12.mlp.down_proj") == 12
    assert layer_index(["transformer", "h", "3", "attn", "c_attn"]) == 3
    assert layer_index("lm_head") is None


def test_uniform_and_describe():
    assert uniform_kind_dict([D7] * 3) == D7 and uniform_kind_dict(7) == dict.fromkeys(D7, 7)
    assert uniform_kind_dict([D7, D6]) is None
    assert describe(D7) == "7, 10, 7, 7" and describe([D7] * 4) == "7, 10, 7, 7"
    assert describe([D6, D6, D7, 5]) == "L0-1: 6, 9, 7, 8; L2: 7, 10, 7, 7; L3: 5, 5, 5, 5"
    assert bits_for([D6, 5], "o", 1) == 5
