"""Build an empty transformers causal LM from a config and fill it from named float tensors."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["empty_causal_lm", "load_float_tensors"]


def empty_causal_lm(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` without random initialisation (every parameter must be
    filled afterwards: :func:`load_float_tensors` checks it), in eval mode, tied weights tied."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.tie_weights()
    return model


def load_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], *, what: str,
                       already: set[int] = frozenset()) -> None:
    """Copy ``tensors`` (HF names) into ``model``'s parameters/buffers; every parameter must end up
    loaded (``already``: ids of tensors filled some other way). Raises ``ValueError`` naming the
    first unknown or missing names."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers()))
    unknown = [n for n in tensors if n not in targets]
    if unknown:
        raise ValueError(f"{what}: tensors {unknown[:5]} ({len(unknown)} in all) have no place in "
                         f"{type(model).__name__}")
    loaded = set(already)
    with torch.no_grad():
        for name, val in tensors.items():
            t = targets[name]
            if tuple(val.shape) != tuple(t.shape):
                raise ValueError(f"{what}: {name} has shape {tuple(val.shape)}, the model needs {tuple(t.shape)}")
            t.copy_(val.to(t.dtype))
            loaded.add(id(t))
    missing = [n for n, p in model.named_parameters() if id(p) not in loaded]
    if missing:
        raise ValueError(f"{what}: no tensor for {missing[:5]} ({len(missing)} in all)")
