"""Sparse window attention (ALISA) at run time: ``state`` (budgets, scores, selection),
``ring`` (the score window's decode rows), ``policies`` (alisa, h2o, streaming as objects), ``step`` (one attention call), ``attend`` (the CPU math over the kept rows), ``op`` (the ops'
implementations, with the state owned by the sequence's cache)."""
from llm_compile.runtime.swa.state import SWAState, compute_budget, describe_policy  # noqa: F401
from llm_compile.runtime.swa.attend import gather_attend_torch, gather_rows  # noqa: F401
from llm_compile.runtime.swa.step import new_state, query_weights, swa_step  # noqa: F401
from llm_compile.runtime.swa import op  # noqa: F401,E402  (registers the op implementations)
