"""Evaluation harness on a real model (perplexity, streaming perplexity, passkey, agreement).

Modules: :mod:`~llm_compile.eval.model` (SmolLM2-135M offline + cache, compile helpers),
:mod:`~llm_compile.eval.data` (WEB Bible splits by book), :mod:`~llm_compile.eval.metrics`
(perplexity, streaming perplexity, agreement), :mod:`~llm_compile.eval.passkey`,
:mod:`~llm_compile.eval.runner` (configs x metrics), :mod:`~llm_compile.eval.report` (tables,
plots), :mod:`~llm_compile.eval.cli` (``python -m llm_compile.eval``).

The common names are importable from here; submodules load on first use, so importing the
package stays cheap (and does not set the offline environment variables until the model module
is used).
"""
import importlib

_EXPORTS = {
    "load_smollm2": "model", "compile_model": "model", "uncompile_model": "model",
    "eager_forward": "model", "load_split": "data", "load_tokens": "data",
    "prompt_windows": "data", "perplexity": "metrics", "streaming_perplexity": "metrics",
    "agreement": "metrics", "greedy_generate": "metrics", "passkey_retrieval": "passkey",
    "EvalSettings": "runner", "run_configs": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
