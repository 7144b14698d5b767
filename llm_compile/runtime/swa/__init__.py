"""Sparse window attention (ALISA) at run time: ``state`` (budgets, scores, selection),
``policies`` (alisa, h2o, streaming as objects), ``step`` (the attention math), ``op`` (the ops'
implementations, with the state owned by the sequence's cache)."""
from llm_compile.runtime.swa.state import SWAState, compute_budget, describe_policy  # noqa: F401
from llm_compile.runtime.swa.step import (gather_attend_torch, gather_rows, new_state,  # noqa: F401
                                          query_weights, swa_step)
from llm_compile.runtime.swa import op  # noqa: F401,E402  (registers the op implementations)
