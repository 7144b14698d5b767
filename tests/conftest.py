import os
import sys

# Triton reads TRITON_INTERPRET when it is first imported: on this CPU test run, generated kernels
# must go through the interpreter. A GPU run sets TRITON_INTERPRET=0 explicitly (see README).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests/model_zoo.py

# Under pytest-xdist (the README's command runs one worker per core) each worker gets its share of
# the cores: torch's default (all cores per process) oversubscribes them and slows every test.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (excluded from the default run with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "real_model: loads the real SmolLM2-135M model")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
