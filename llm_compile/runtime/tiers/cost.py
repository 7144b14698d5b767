"""The cost model of tiered KV, measured once per machine and model shape and cached on disk.

What is measured (seconds; a "row" is one (sequence, KV head) row of K and V together, ``D + Dv``
values of the model's dtype)::

    dev_row_s     gather one row from a device-tier buffer (index_select by slot, on the device)
    host_row_s    gather one row from the host tier (index_select on the CPU; RAM, or the mmap file)
    h2d_bytes_s   host -> device copy bandwidth (bytes/s; CPU models: a RAM copy)
    recompute_tok_s   recompute K and V of one token from the layer input (x @ [Wk; Wv], hidden -> 2*Hkv*D)

The JSON file is ``<cache_dir>/cost-<key>.json``; the key names the machine (host name, CPU or GPU
name), device type, dtype, host-tier kind and shape (hidden, KV heads, head dims), so another
machine or model measures again. ``measure_cost`` takes ~0.1-0.5 s.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_DIR = Path.home() / ".cache" / "llm_compile" / "kv_tiers"


@dataclass(frozen=True)
class Cost:
    dev_row_s: float
    host_row_s: float
    h2d_bytes_s: float
    recompute_tok_s: float
    key: str = ""
    measured: bool = True
    """False when read from the cache file (measured by an earlier run)."""


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def cost_key(device: torch.device, dtype: torch.dtype, hidden: int, heads: int, d: int, dv: int,
             host: str) -> str:
    text = json.dumps([platform.node(), _machine(), device.type, str(dtype), hidden, heads, d, dv, host])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _time(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _host_buffer(rows: int, width: int, dtype, host: str, mmap_dir: str | None):
    if host == "mmap":
        fd, path = tempfile.mkstemp(prefix="llmaccel-cost-", dir=mmap_dir)
        os.close(fd)
        n = rows * width
        os.truncate(path, n * torch.empty(0, dtype=dtype).element_size())
        buf = torch.from_file(path, shared=True, size=n, dtype=dtype).view(rows, width)
        os.unlink(path)  # the mapping keeps the data until the tensor dies
        buf.copy_(torch.randn(rows, width).to(dtype))
        return buf
    buf = torch.randn(rows, width).to(dtype)
    return buf.pin_memory() if host == "pinned" else buf


def measure_cost(device: torch.device, dtype: torch.dtype, hidden: int, heads: int, d: int, dv: int,
                 host: str, mmap_dir: str | None = None) -> Cost:
    """Measure the four costs on this machine (see the module docstring)."""
    width, rows, picks = d + dv, 1 << 15, 4096
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, rows, (picks,), generator=g)
    host_buf = _host_buffer(rows, width, dtype, host, mmap_dir)
    dev_buf = torch.randn(rows, width, generator=g).to(device=device, dtype=dtype)
    idx_dev = idx.to(device)
    dev_row = _time(lambda: dev_buf.index_select(0, idx_dev)) / picks
    host_row = _time(lambda: host_buf.index_select(0, idx)) / picks
    chunk = host_buf[:4096]
    if device.type == "cuda":
        h2d = chunk.nbytes / _time(lambda: chunk.to(device, non_blocking=True))
    else:
        h2d = chunk.nbytes / _time(lambda: chunk.clone())
    x = torch.randn(256, hidden, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(hidden, heads * (d + dv), generator=g).to(device=device, dtype=dtype)
    rec = _time(lambda: x @ w) / 256
    return Cost(dev_row, host_row, h2d, rec)


def load_or_measure(device: torch.device, dtype: torch.dtype, hidden: int, heads: int, d: int, dv: int,
                    host: str, cache_dir: str | None = None, mmap_dir: str | None = None) -> Cost:
    """The cached cost of this machine and shape, measured (and written) when there is none."""
    key = cost_key(device, dtype, hidden, heads, d, dv, host)
    path = Path(cache_dir or DEFAULT_DIR) / f"cost-{key}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return Cost(**{**data, "key": key, "measured": False})
        except (ValueError, TypeError):
            pass  # a damaged or old file: measure again
    cost = measure_cost(device, dtype, hidden, heads, d, dv, host, mmap_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: v for k, v in asdict(cost).items() if k not in ("key", "measured")}))
    os.replace(tmp, path)
    return Cost(**{**asdict(cost), "key": key})
