"""KV storage at run time: ``buffer`` (preallocated buffers appended in place), ``store`` (the
``llmaccel::stored_attention`` implementation, KV owned by the cache), ``cache`` (``LLMAccelCache``)."""
from llm_compile.runtime.kv.buffer import SiteKV  # noqa: F401
from llm_compile.runtime.kv import store  # noqa: F401  (registers llmaccel::stored_attention)
