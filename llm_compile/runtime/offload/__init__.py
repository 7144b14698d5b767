"""Attention offload runtime (Lamina): attention workers that hold the KV cache, and the compute
side's pool. Modules, each importing only those before it::

    protocol   wire format (headers, payloads, status replies; no pickles)
    sequences  SequenceHandle (a sequence's KV on the workers, owned by the model's cache)
    modes      attention steps a worker runs (dense, SWA, "module:function"), sent as JSON specs
    workers    the worker request loop; ``python -m llm_compile.runtime.offload`` starts one
    lifecycle  start-up and fault watching, reaping of worker processes
    future     OffloadFuture: a request in flight
    pool       AttentionWorkerPool: rank 0, splits KV heads over the workers
    shared     SharedPool (one per offload config, restarts after a fault, hands out sequences)
    overlap    two micro-batches in ping-pong around the attention calls
"""
from llm_compile.runtime.offload.future import OffloadFuture
from llm_compile.runtime.offload.pool import AttentionWorkerPool
from llm_compile.runtime.offload.sequences import SequenceHandle
from llm_compile.runtime.offload.shared import SharedPool, get_pool, shutdown_pools

__all__ = ["AttentionWorkerPool", "OffloadFuture", "SequenceHandle", "SharedPool", "get_pool", "shutdown_pools"]
