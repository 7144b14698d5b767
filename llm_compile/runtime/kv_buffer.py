"""Moved to :mod:`llm_compile.runtime.kv.buffer` (kept for the offload workers' import)."""
from llm_compile.runtime.kv.buffer import SiteKV  # noqa: F401
