"""Custom ops of the ``llmaccel::`` namespace (``torch.library.custom_op`` + ``register_fake``).

Importing this package registers every op; the passes refer to them as ``torch.ops.llmaccel.*``.
"""
from llm_compile.ops import anda  # noqa: F401  (registers llmaccel::anda_linear)
from llm_compile.ops import attention  # noqa: F401  (registers llmaccel::attention, static_attention)
from llm_compile.ops import offload  # noqa: F401  (registers llmaccel::offload_attention, kv_phantom)
from llm_compile.ops import kv_store  # noqa: F401  (declares llmaccel::stored_attention)
from llm_compile.ops import swa  # noqa: F401  (declares llmaccel::swa_attention, static_swa_attention)

__all__ = ["anda", "attention", "kv_store", "offload", "swa"]
