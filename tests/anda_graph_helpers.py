"""Shared helpers of the Anda lowering tests: the ATen graph the backend hands to the passes."""
import torch
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

from llm_compile.config import parse_options
from llm_compile.passes import anda_lowering
from llm_compile.passes.base import PassContext
from llm_compile.passes.cleanup import cleanup

ANDA = torch.ops.llmaccel.anda_linear.default


def aten_graph(fn, *args):
    """What the backend does up to the passes: Dynamo -> AOTAutograd (inference, Inductor decomps).
    Returns ``(aten_gm, ctx)`` for the first graph; ``ctx.example_inputs`` are replaced by the real
    Dynamo inputs (same order as the ATen placeholders here: no parameters are lifted)."""
    from torch._inductor.decomposition import select_decomp_table

    out = {}

    def backend(gm, example_inputs):
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]

        def fw(agm, ainputs):
            anames = [n.name for n in agm.graph.nodes if n.op == "placeholder"]
            out.setdefault("gm", agm)
            out.setdefault("ctx", PassContext("graph_000", list(ainputs), dict(zip(anames, names))))
            out.setdefault("real", list(example_inputs))         # Dynamo's inputs are real tensors
            return make_boxed_func(agm.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw, decompositions=select_decomp_table())

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=False)(*args)
    ctx = out["ctx"]
    assert len(out["real"]) == len(ctx.example_inputs)
    assert all(not isinstance(t, torch._subclasses.FakeTensor) for t in out["real"])
    ctx.example_inputs = out["real"]
    return out["gm"], ctx


def run_graph(gm, ctx):
    with torch.no_grad():
        res = gm(*ctx.example_inputs)
    return res[0] if isinstance(res, (tuple, list)) else res


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _lower(gm, ctx, **anda):
    gm = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())          # keep the fixture graph intact
    ctx = PassContext(ctx.graph_id, ctx.example_inputs, ctx.placeholder_sources)
    res = anda_lowering.run(gm, parse_options({"anda": anda}), ctx)
    cleanup(gm)
    return gm, ctx, res
