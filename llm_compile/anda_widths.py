"""The value of ``options={"anda": {"mantissa_bits": ...}}``: parsing and per-linear lookup.

Three forms (checked when the options are parsed; a malformed value raises
:class:`llm_compile.option_rules.OptionsError` naming what is wrong):

* an int ``M`` in 1..16: every FP-INT linear;
* a dict over the module kinds ``qkv, o, gate_up, down`` (exactly these keys), each an int 1..16:
  one width per kind, shared by every layer;
* a list (or tuple) with **one entry per decoder layer**, each entry an int or such a kind dict:
  layer ``i`` (the first integer in the linear's module path, ``model.layers.<i>.mlp.down_proj``)
  uses entry ``i``. This is what the layer-band search writes (:mod:`llm_compile.anda_bands`)::

      {"mantissa_bits": [{"qkv": 7, "o": 9, "gate_up": 7, "down": 7}] * 10
                      + [{"qkv": 7, "o": 10, "gate_up": 7, "down": 7}] * 20}

  A linear whose module path has no layer index, or whose layer is past the end of the list, is not
  lowered: the pass lists it in ``passes.json`` with the reason (and warns once).

Parsed values are normalised: a dict becomes a plain ``dict``, a list a ``tuple`` of ints / dicts.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from llm_compile.option_rules import OptionsError, OutOfRange, is_int

ANDA_MODULE_KINDS = ("qkv", "o", "gate_up", "down")

TEXT = ("an int in [1, 16], a dict of such ints over qkv, o, gate_up, down, or a list with one such "
        "int or dict per decoder layer")
"""What ``anda.mantissa_bits`` accepts, in words (error messages, README options table)."""

__all__ = ["ANDA_MODULE_KINDS", "TEXT", "type_ok", "normalise", "bits_for", "layer_index",
           "is_per_layer", "uniform_kind_dict", "describe"]


def _entry_type_ok(v) -> bool:
    return is_int(v) or (isinstance(v, Mapping) and all(is_int(b) for b in v.values()))


def type_ok(v) -> bool:
    """Whether ``v`` has one of the three forms' types (ranges and keys are checked by :func:`normalise`)."""
    if isinstance(v, (list, tuple)):
        return len(v) > 0 and all(_entry_type_ok(e) for e in v)
    return _entry_type_ok(v)


def _entry(value, where: str):
    if isinstance(value, Mapping):
        missing = sorted(set(ANDA_MODULE_KINDS) - set(value))
        extra = sorted(map(str, set(value) - set(ANDA_MODULE_KINDS)))
        if missing or extra:
            raise OptionsError(
                f"llmaccel: option anda.mantissa_bits{where}={dict(value)!r}: the dict needs exactly the "
                f"keys {list(ANDA_MODULE_KINDS)} (missing {missing}, unknown {extra})")
        values = list(value.values())
    else:
        values = [value]
    if any(not 1 <= b <= 16 for b in values):
        raise OutOfRange
    return {k: int(value[k]) for k in ANDA_MODULE_KINDS} if isinstance(value, Mapping) else int(value)


def normalise(value):
    """Checked and normalised value (called by the option rule after :func:`type_ok`)."""
    if not isinstance(value, (list, tuple)):
        return _entry(value, "")
    out = []
    for i, e in enumerate(value):
        try:
            out.append(_entry(e, f"[{i}]"))
        except OutOfRange:
            raise OptionsError(f"llmaccel: option anda.mantissa_bits[{i}]={e!r} (layer {i}) is out of "
                               f"range; every width must be an int in [1, 16]") from None
    return tuple(out)


def is_per_layer(value) -> bool:
    return isinstance(value, (list, tuple))


def layer_index(path: Sequence[str]) -> int | None:
    """Decoder layer of a module path (``['model', 'layers', '3', 'mlp', 'down_proj']`` or
    ``'model.layers.3.mlp.down_proj'``): its first all-digit component, or ``None``."""
    parts = path.split(".") if isinstance(path, str) else path
    for p in parts:
        if p.isdigit():
            return int(p)
    return None


def bits_for(value, kind: str, layer: int | None = None) -> int:
    """Width of a linear of ``kind`` in ``layer`` under a normalised ``value``. Raises ``LookupError``
    (with the reason) when a per-layer value has no entry for the linear."""
    if is_per_layer(value):
        if layer is None:
            raise LookupError("anda.mantissa_bits is per layer, but this linear's module path has no "
                              "layer index")
        if not 0 <= layer < len(value):
            raise LookupError(f"anda.mantissa_bits lists {len(value)} layers (give one entry per "
                              f"decoder layer): none for layer {layer}")
        value = value[layer]
    return int(value[kind]) if isinstance(value, Mapping) else int(value)


def uniform_kind_dict(value) -> dict[str, int] | None:
    """The kind dict equal to ``value`` when every layer has the same widths (any form), else ``None``."""
    entries = list(value) if is_per_layer(value) else [value]
    dicts = [{k: bits_for(e, k) for k in ANDA_MODULE_KINDS} for e in entries]
    return dicts[0] if all(d == dicts[0] for d in dicts) else None


def describe(value) -> str:
    """Short text: ``"7, 10, 7, 7"`` (qkv, o, gate_up, down), or per run of equal layers
    ``"L0-9: 7, 9, 7, 7; L10-29: 7, 10, 7, 7"``."""
    def one(e):
        return ", ".join(str(bits_for(e, k)) for k in ANDA_MODULE_KINDS)

    uni = uniform_kind_dict(value)
    if uni is not None:
        return one(uni)
    runs: list[list[Any]] = []
    for i, e in enumerate(value):
        if runs and one(runs[-1][2]) == one(e):
            runs[-1][1] = i
        else:
            runs.append([i, i, e])
    return "; ".join(f"L{a}-{b}: {one(e)}" if a != b else f"L{a}: {one(e)}" for a, b, e in runs)
