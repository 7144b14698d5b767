"""Wire protocol between the compute process (rank 0) and the attention workers (ranks >= 1).

Everything travels as ``torch.distributed`` point-to-point messages (``isend``/``irecv``) on one
process group: gloo for CPU tensors, NCCL for CUDA tensors, the same code for both. A request is

1. a fixed-size ``int64[HEADER_LEN]`` header (:class:`Header`: op code, message number, sequence
   id, site, shapes, dtype codes, scale, flags, payload size), tag :data:`TAG_REQUEST`;
2. if ``payload_nbytes > 0``, one ``uint8`` payload: the tensors of the request (q, k_new, v_new,
   mask) packed back to back as raw bytes, or, for :data:`OP_SET_MODE`, an attention-mode spec in
   JSON (:func:`llm_compile.runtime.offload.modes.mode_from_spec` builds only the known mode
   classes), same tag.

Every request gets exactly one reply, tag :data:`TAG_REPLY`: a ``uint8`` buffer of
:data:`STATUS_BYTES` status bytes (status code, message number, two int64 values, an error message
in UTF-8) followed by the output bytes when the request asked for an output. The sender knows the
reply size in advance, so replies are received straight into a preallocated buffer. A worker that
fails on a request still sends the full-size reply (status = error), so the stream never desyncs.

Tensors are shipped as raw bytes (``tensor.view(torch.uint8)``) so any dtype (bf16, bool masks)
travels the same way on every backend. Nothing received is ever unpickled: a header is 24 int64
checked against :data:`MAGIC` and the known op codes, payloads are raw tensor bytes or JSON.

KV on the workers is keyed by ``(seq_id, site)``: one entry per sequence (an id the compute side
allocates per prefill, see :class:`~llm_compile.runtime.offload.sequences.SequenceHandle`) and
attention site; :data:`OP_RELEASE` frees a sequence.
"""
from __future__ import annotations

import json
import struct
from dataclasses import astuple, dataclass

import torch
from torch import Tensor

MAGIC = 0x4C414D49  # "LAMI"
HEADER_LEN = 24
STATUS_BYTES = 256
TAG_REQUEST = 0
TAG_REPLY = 1
MAX_PAYLOAD = 1 << 36
"""Largest payload a worker accepts (a corrupt header must not allocate without bound)."""

# op codes
OP_ATTEND = 1
"""Append k/v to the (seq_id, site) cache (reset it first with FLAG_RESET); with FLAG_HAS_Q
attend q over the whole cache and reply with the output; otherwise reply with the status only."""
OP_KV_BYTES = 2
"""Reply values: KV bytes in use, KV bytes allocated."""
OP_RELEASE = 3
"""Drop the KV of sequence ``seq_id`` (all sites when site == -1; a plain sequence id releases
its sub-batches too, see :data:`SUB_BATCH_SHIFT`)."""
OP_SET_MODE = 4
"""Payload: an attention-mode spec (JSON); seq_id == site == -1 sets the worker default, otherwise
it applies to that (seq_id, site) from its next reset on."""
OP_SHUTDOWN = 5
OP_PING = 6
OP_NAMES = {OP_ATTEND: "attend", OP_KV_BYTES: "kv_bytes", OP_RELEASE: "release",
            OP_SET_MODE: "set_mode", OP_SHUTDOWN: "shutdown", OP_PING: "ping"}

# flags
FLAG_CAUSAL = 1
FLAG_RESET = 2
FLAG_HAS_Q = 4
FLAG_NOW = 8
"""On OP_SHUTDOWN: exit at once, no reply (also the "fin" after a graceful shutdown)."""

# mask kinds
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2

STATUS_OK, STATUS_ERROR = 0, 1

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.bool, torch.uint8,
           torch.int8, torch.int32, torch.int64]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODE[dtype]
    except KeyError:
        raise TypeError(f"llmaccel offload: dtype {dtype} cannot be shipped to attention workers") from None


def code_dtype(code: int) -> torch.dtype:
    return _DTYPES[int(code)]


def float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


@dataclass
class Header:
    """The fixed-size request header; field order is the wire order."""

    op: int
    msg: int = 0
    """Message number (echoed in the reply)."""
    seq_id: int = 0
    """The sequence whose KV the request reads or writes."""
    site: int = 0
    batch: int = 0
    q_heads: int = 0
    kv_heads: int = 0
    q_len: int = 0
    new_len: int = 0
    head_dim: int = 0
    v_dim: int = 0
    dtype: int = 0
    mask_kind: int = MASK_NONE
    mask_dtype: int = 0
    mask_s0: int = 1
    mask_s1: int = 1
    mask_s2: int = 1
    mask_s3: int = 1
    scale_bits: int = 0
    flags: int = 0
    payload_nbytes: int = 0
    cached_len: int = -1
    """Cache length the sender expects before the append (-1: do not check)."""
    head_offset: int = 0
    """Global index of this worker's first KV head (for modes that care; informational)."""

    def to_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        return torch.tensor([MAGIC, *astuple(self)], dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Header":
        vals = t.cpu().tolist()
        if vals[0] != MAGIC:
            raise RuntimeError(f"llmaccel offload: bad header magic {vals[0]:#x} (protocol desync)")
        hdr = cls(*vals[1:])
        if hdr.op not in OP_NAMES:
            raise RuntimeError(f"llmaccel offload: unknown op code {hdr.op} (protocol desync)")
        if not 0 <= hdr.payload_nbytes <= MAX_PAYLOAD:
            raise RuntimeError(f"llmaccel offload: payload of {hdr.payload_nbytes} bytes refused")
        return hdr

    @property
    def mask_shape(self) -> tuple[int, int, int, int]:
        return (self.mask_s0, self.mask_s1, self.mask_s2, self.mask_s3)

    @property
    def scale(self) -> float:
        return bits_float(self.scale_bits)


assert len(Header.__dataclass_fields__) + 1 == HEADER_LEN


def empty_header(device: torch.device | str = "cpu") -> Tensor:
    return torch.empty(HEADER_LEN, dtype=torch.int64, device=device)


def as_bytes(t: Tensor) -> Tensor:
    """A flat ``uint8`` view (copy if not contiguous) of ``t``."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8)


def pack(tensors: list[Tensor], device: torch.device | str) -> Tensor:
    """Concatenate the raw bytes of ``tensors`` into one ``uint8`` buffer on ``device``."""
    parts = [as_bytes(t.to(device)) for t in tensors if t.numel()]
    if not parts:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return parts[0].clone() if len(parts) == 1 else torch.cat(parts)


def unpack(buf: Tensor, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[Tensor]:
    """Split ``buf`` back into tensors of the given (shape, dtype), in order (views, no copy)."""
    out, off = [], 0
    for shape, dtype in specs:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        out.append(buf[off:off + nbytes].view(dtype).reshape(shape))
        off += nbytes
    if off != buf.numel():
        raise RuntimeError(f"llmaccel offload: payload of {buf.numel()} bytes, expected {off} (protocol desync)")
    return out


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def make_status(status: int, msg_no: int, v1: int = 0, v2: int = 0, message: str = "",
                device: torch.device | str = "cpu", extra: int = 0) -> Tensor:
    """A reply buffer: the status block followed by ``extra`` zeroed output bytes."""
    buf = torch.zeros(STATUS_BYTES + extra, dtype=torch.uint8)
    buf[:32].view(torch.int64).copy_(torch.tensor([status, msg_no, v1, v2], dtype=torch.int64))
    msg = message.encode("utf-8", "replace")[: STATUS_BYTES - 32]
    if msg:
        buf[32:32 + len(msg)] = torch.frombuffer(bytearray(msg), dtype=torch.uint8)
    return buf.to(device)


def read_status(buf: Tensor) -> tuple[int, int, int, int, str]:
    """(status, message number, v1, v2, message) of a reply buffer."""
    head = buf[:STATUS_BYTES].cpu()
    status, msg_no, v1, v2 = head[:32].view(torch.int64).tolist()
    msg = bytes(head[32:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
    return status, msg_no, v1, v2, msg


def json_payload(obj) -> Tensor:
    """``obj`` (JSON-serialisable) as a ``uint8`` payload."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def read_json(buf: Tensor):
    """The JSON value of a payload made by :func:`json_payload` (plain data only, never code)."""
    return json.loads(bytes(buf.cpu().tolist()).decode("utf-8"))


SUB_BATCH_SHIFT = 52
"""A worker key is ``seq_id + (h + 1) << SUB_BATCH_SHIFT`` for sub-batch ``h`` of a sequence
(``offload.overlap``'s halves) and ``seq_id`` itself otherwise; sequence ids stay below 2**52."""


def base_sequence(key: int) -> int:
    """The sequence a worker key belongs to."""
    return key & ((1 << SUB_BATCH_SHIFT) - 1)


def started_key(rank: int) -> str:
    """Store key a worker sets once its process runs (before it joins the group): start-up errors
    then say which ranks never started and which did not finish the rendezvous."""
    return f"llmaccel_offload_started/{rank}"


def split_heads(kv_heads: int, n_workers: int) -> list[tuple[int, int]]:
    """Contiguous KV-head ranges ``[start, end)`` per worker; the first ``kv_heads % n`` workers
    get one head more. Workers beyond ``kv_heads`` get an empty range (and no requests)."""
    base, extra = divmod(kv_heads, n_workers)
    ranges, start = [], 0
    for i in range(n_workers):
        n = base + (1 if i < extra else 0)
        ranges.append((start, start + n))
        start += n
    return ranges
