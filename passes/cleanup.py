"""The one shared graph cleanup: dead code elimination, lint, recompile."""
from __future__ import annotations

import torch.fx


def cleanup(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
