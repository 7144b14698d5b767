"""KV buffers on transparent huge pages (runtime/kv/hugepages.py): same tensor semantics as
``torch.empty``, and the large CPU ones are mappings advised MADV_HUGEPAGE (smaps flag ``hg``)."""
import gc
import mmap
import os

import pytest
import torch

from llm_compile.runtime.kv.buffer import SiteKV
from llm_compile.runtime.kv.hugepages import MIN_BYTES, empty_kv


def _vm_flags(t) -> set[str] | None:
    """The smaps VmFlags of the mapping holding ``t``'s first byte (or address ``t``; None if it is
    not mapped or smaps is not readable)."""
    addr = t if isinstance(t, int) else t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    return None


def test_small_and_large_buffers_behave_like_torch_empty():
    for shape in [(2, 3, 5, 8), (4, 3, 8192, 64)]:
        t = empty_kv(shape, torch.float32, "cpu")
        assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
        t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(shape))
        assert t.view(-1)[-1].item() == t.numel() - 1
        u = t.clone()
        t.zero_()
        assert u.sum() > 0 and t.sum() == 0          # independent storage, writable
    h = empty_kv((4, 3, 8192, 64), torch.float16, "cpu")
    assert h.dtype == torch.float16 and h.element_size() == 2


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.exists("/proc/self/smaps"),
                    reason="Linux with MADV_HUGEPAGE only")
def test_large_cpu_buffers_are_advised_huge_pages_and_small_ones_are_not():
    big = empty_kv((4, 3, 8192, 64), torch.float32, "cpu")        # 25 MB
    small = empty_kv((1, 1, 8, 64), torch.float32, "cpu")
    assert big.numel() * 4 >= MIN_BYTES
    assert "hg" in _vm_flags(big)
    flags = _vm_flags(small)
    assert flags is None or "hg" not in flags


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.exists("/proc/self/smaps"),
                    reason="Linux with MADV_HUGEPAGE only")
def test_mapping_is_released_with_the_tensor():
    t = empty_kv((4, 3, 8192, 64), torch.float32, "cpu")
    t.fill_(1.0)
    addr = t.data_ptr()
    assert "hg" in _vm_flags(addr)
    del t
    gc.collect()
    flags = _vm_flags(addr)
    assert flags is None or "hg" not in flags      # unmapped (no leak of 25 MB per buffer)


def test_site_kv_grows_into_advised_buffers():
    kv = SiteKV(4, 3, 64, 64, torch.float32, torch.device("cpu"), mode=None, state=None, reserve=16)
    k = torch.randn(4, 3, 4096, 64)
    kv.append(k, k)
    kv.append(k[:, :, :1], k[:, :, :1])
    assert torch.equal(kv.keys()[:, :, :4096], k) and kv.keys().shape[2] == 4097
    if hasattr(mmap, "MADV_HUGEPAGE") and os.path.exists("/proc/self/smaps"):
        assert "hg" in _vm_flags(kv.k) and "hg" in _vm_flags(kv.v)
