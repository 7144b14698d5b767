"""Registers the ``"llmaccel"`` quant method with transformers so that ``from_pretrained`` of a
folder written by :func:`llm_compile.save_quantized` refuses with a message naming
:func:`llm_compile.load_quantized` (instead of transformers' "unknown quantization type: skipping"
warning followed by a model with random weights)."""
from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from llm_compile.checkpoints.native import QUANT_METHOD

__all__ = ["REFUSAL"]

REFUSAL = ("this folder holds an llm_compile quantized model (QuantLinear integer weights), which "
           "transformers' from_pretrained cannot build; load it with "
           "llm_compile.load_quantized(<folder>)")


class LLMAccelQuantizationConfig(QuantizationConfigMixin):
    def __init__(self, **kwargs):
        self.quant_method = QUANT_METHOD
        self.details = {k: v for k, v in kwargs.items() if k != "quant_method"}


class LLMAccelRefusingQuantizer(HfQuantizer):
    def __init__(self, quantization_config, **kwargs):
        raise ValueError(REFUSAL)

    def is_serializable(self):
        return False

    @property
    def is_trainable(self):
        return False


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(LLMAccelQuantizationConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(LLMAccelRefusingQuantizer)
