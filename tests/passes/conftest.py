import pytest
import torch


@pytest.fixture(scope="module")
def offload_pools_shut_down():
    """After a module's offload tests: every worker pool is shut down and no child process remains."""
    yield
    from llm_compile.runtime.offload import shutdown_pools

    shutdown_pools()
    assert not torch.multiprocessing.active_children()
