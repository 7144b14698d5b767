"""llm_compile: the ``"llmaccel"`` torch.compile backend for LLM inference.

``torch.compile(model.forward, backend="llmaccel", options={...})`` works without importing this
package (an entry point registers the backend); importing it is harmless.
"""
from llm_compile.config import LLMAccelConfig, OptionsError, parse_options

__all__ = ["LLMAccelCache", "LLMAccelConfig", "OptionsError", "parse_options", "llmaccel",
           "quantize_weights", "load_quantized", "save_quantized"]


def __getattr__(name):
    if name == "llmaccel":
        from llm_compile.backend import llmaccel

        return llmaccel
    if name == "LLMAccelCache":  # a transformers.Cache: imported on first use (needs transformers)
        from llm_compile.runtime.kv.cache import LLMAccelCache

        return LLMAccelCache
    if name == "quantize_weights":
        from llm_compile.quantize import quantize_weights

        return quantize_weights
    if name in ("load_quantized", "save_quantized"):
        import llm_compile.checkpoints as checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(name)
