"""KV storage at run time: ``buffer`` (preallocated buffers appended in place), ``store`` (the
``llmaccel::stored_attention`` implementation, KV owned by the cache), ``cache`` (``LLMAccelCache``).

Importing the package imports only ``buffer`` (the offload workers need it, and ``llm_compile.ops``
reaches them); ``local_kv_store`` imports ``store`` itself, which registers the op implementation."""
from llm_compile.runtime.kv.buffer import SiteKV  # noqa: F401
