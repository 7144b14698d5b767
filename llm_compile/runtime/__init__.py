"""Run-time parts of the backend, by feature: ``kv/`` (in-place KV buffers, LLMAccelCache),
``swa/`` (sparse window attention state and policies), ``offload_*`` (attention workers).
Importing this package registers the implementations of the ``llmaccel::`` ops that need them."""
from llm_compile.runtime import kv, swa  # noqa: F401
