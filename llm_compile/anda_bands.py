"""Layer bands for the Anda precision search: one mantissa width per (module kind, band).

The ``L`` decoder layers are split into ``bands`` contiguous bands of (nearly) equal size, the first
ones one layer longer when ``L`` is not a multiple (30 layers, 4 bands: 8, 8, 7, 7). The search
(:func:`llm_compile.anda_search.adaptive_precision_search`) then works on *slots*: with one band the
slots are the four kinds (``qkv, o, gate_up, down``: the paper's per-kind tuple, unchanged), with
more they are ``"<kind>@<first>-<last>"`` (``"o@10-19"``), each with the MACs of its layers, so the
BOPs of a slot assignment are the BOPs of the model it describes. :func:`to_mantissa_bits` turns a
slot assignment into the value of ``options={"anda": {"mantissa_bits": ...}}`` (a kind dict for one
band, else the per-layer list of :mod:`llm_compile.anda_widths`)::

    >>> slots = band_slots(30, 3)
    >>> slots[:5]
    ['qkv@0-9', 'o@0-9', 'gate_up@0-9', 'down@0-9', 'qkv@10-19']
    >>> to_mantissa_bits(dict.fromkeys(slots, 7), 30, 3)[0]
    {'qkv': 7, 'o': 7, 'gate_up': 7, 'down': 7}

``bands = L`` is a per-layer search.
"""
from __future__ import annotations

from typing import Mapping

from llm_compile.anda_widths import ANDA_MODULE_KINDS, bits_for, is_per_layer

__all__ = ["band_ranges", "band_slots", "slot_macs", "to_mantissa_bits", "slots_from"]


def band_ranges(num_layers: int, bands: int) -> list[tuple[int, int]]:
    """``[(first, last), ...]`` (inclusive) of ``bands`` contiguous bands over ``num_layers`` layers."""
    if not isinstance(bands, int) or not 1 <= bands <= num_layers:
        raise ValueError(f"bands={bands!r} must be an int in 1..{num_layers} (the number of layers)")
    size, extra = divmod(num_layers, bands)
    out, first = [], 0
    for b in range(bands):
        n = size + (b < extra)
        out.append((first, first + n - 1))
        first += n
    return out


def band_slots(num_layers: int, bands: int) -> list[str]:
    """Slot names, band-major: the kinds for one band, else ``kind@first-last`` per band."""
    if bands == 1:
        band_ranges(num_layers, 1)
        return list(ANDA_MODULE_KINDS)
    return [f"{k}@{a}-{b}" for a, b in band_ranges(num_layers, bands) for k in ANDA_MODULE_KINDS]


def _parse(slot: str) -> tuple[str, int, int] | None:
    kind, _, rng = slot.partition("@")
    if not rng:
        return None
    a, _, b = rng.partition("-")
    return kind, int(a), int(b)


def slot_macs(kind_macs: Mapping[str, float], num_layers: int, bands: int) -> dict[str, float]:
    """MACs per token of each slot, from the MACs of each kind over all ``num_layers`` (equal layers)."""
    out = {}
    for slot in band_slots(num_layers, bands):
        p = _parse(slot)
        if p is None:
            out[slot] = float(kind_macs[slot])
        else:
            kind, a, b = p
            out[slot] = kind_macs[kind] * (b - a + 1) / num_layers
    return out


def to_mantissa_bits(widths: Mapping[str, int], num_layers: int, bands: int):
    """The ``mantissa_bits`` option value of a slot assignment (kind dict for one band, else one kind
    dict per layer)."""
    if bands == 1:
        return {k: int(widths[k]) for k in ANDA_MODULE_KINDS}
    layers = []
    for a, b in band_ranges(num_layers, bands):
        entry = {k: int(widths[f"{k}@{a}-{b}"]) for k in ANDA_MODULE_KINDS}
        layers.extend(dict(entry) for _ in range(a, b + 1))
    return layers


def slots_from(value, num_layers: int, bands: int) -> dict[str, int]:
    """Slot assignment of a ``mantissa_bits`` value (int, kind dict or per-layer list: a start point).
    Raises ``ValueError`` when a band's layers disagree on a kind's width."""
    out = {}
    if is_per_layer(value) and len(value) != num_layers:
        raise ValueError(f"the per-layer value has {len(value)} entries for {num_layers} layers")
    for a, b in band_ranges(num_layers, bands):
        for k in ANDA_MODULE_KINDS:
            ws = {bits_for(value, k, i if is_per_layer(value) else None) for i in range(a, b + 1)}
            if len(ws) != 1:
                raise ValueError(f"layers {a}-{b} have different {k} widths {sorted(ws)}: not one band")
            out[k if bands == 1 else f"{k}@{a}-{b}"] = ws.pop()
    return out
