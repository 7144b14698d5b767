"""``quantize_weights`` / ``quantize_tensor`` check their arguments up front (issue 13, item 4):
a ``TypeError``/``ValueError`` naming the argument, not a ``ZeroDivisionError`` or a tensor-size
error from deep inside."""
import pytest
import torch
from torch import nn

from llm_compile.quantize import QuantLinear, quantize_tensor, quantize_weights


def _model():
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"group_size": 0}, ValueError, ["group_size=0", "positive"]),
    ({"group_size": -64}, ValueError, ["group_size=-64", "positive"]),
    ({"group_size": 64.0}, TypeError, ["group_size=64.0", "int"]),
    ({"group_size": True}, TypeError, ["group_size=True", "int"]),
    ({"group_size": "64"}, TypeError, ["group_size='64'", "int"]),
    ({"bits": 3}, ValueError, ["bits=3", "4 or 8"]),
    ({"bits": 4.0}, TypeError, ["bits=4.0", "int"]),
    ({"bits": "4"}, TypeError, ["bits='4'", "int"]),
    ({"scale_dtype": torch.int8}, TypeError, ["scale_dtype", "floating"]),
    ({"skip": "lm_head"}, TypeError, ["skip='lm_head'", "tuple"]),
])
def test_quantize_weights_bad_arguments(kwargs, exc, words):
    model = _model()
    with pytest.raises(exc) as e:
        quantize_weights(model, **kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert all(type(m) is not QuantLinear for m in model.modules())  # nothing half-done


@pytest.mark.parametrize("bits, gs, exc, name", [
    (4, 0, ValueError, "group_size=0"), (4, -64, ValueError, "group_size=-64"),
    (4, 64.0, TypeError, "group_size=64.0"), (5, 64, ValueError, "bits=5"), (8.0, 64, TypeError, "bits=8.0")])
def test_quantize_tensor_bad_arguments(bits, gs, exc, name):
    with pytest.raises(exc) as e:
        quantize_tensor(torch.randn(4, 128), bits, gs)
    assert name in str(e.value)
    with pytest.raises(exc) as e:
        QuantLinear(128, 4, bits=bits, group_size=gs)
    assert name in str(e.value)


def test_valid_arguments_still_quantize():
    model = quantize_weights(_model(), bits=8, group_size=64)
    assert model.llmaccel_quantized == ["0", "2"]
