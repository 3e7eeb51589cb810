"""Dequantization of GGUF (ggml) tensor data in vectorized torch, for the types published Wan GGUF files use.

``dequantize(raw, type)`` turns the bytes of a tensor's rows (uint8 ``[..., row_bytes]``) into its values
``[..., values_per_row]``. The float32 arithmetic is gguf-py's (``gguf.quants.dequantize``): the same products
and sums in the same order, so the values are bit-identical to it; only then are they cast to the dtype asked for.
The order is less delicate than it looks: a float16 scale has 11 significant bits and the integers it multiplies
at most 8, so every product is exact in float32 (24 bits) except Q6_K's ``(d * sc) * q`` (up to 25 bits), and each
value is rounded at most once (by that product, or by the sum with the min): the correctly rounded exact value,
which no reordering or fused multiply-add changes. Pure torch ops on whole tensors, for the CPU and CUDA alike.

Block layouts (little-endian; ``d``/``dmin``/``m`` are float16; a block of ``block`` values in ``block_bytes``):

* Q8_0 ``d, q[32] int8``: ``d * q``.
* Q4_0 ``d, qs[16]``: value ``j`` is the low nibble of ``qs[j]``, value ``16 + j`` the high one; ``d * (q - 8)``.
* Q4_1 ``d, m, qs[16]``: nibbles as Q4_0; ``d * q + m``.
* Q5_0 ``d, qh[4], qs[16]``: nibbles as Q4_0, bit ``j`` of ``qh`` (a little-endian uint32) is value ``j``'s 5th
  bit; ``d * (q - 16)``. Q5_1 ``d, m, qh[4], qs[16]``: ``d * q + m``.
* K-quants: 256 values in sub-blocks of 16 or 32, each with its own integer scale (and min) times the float16
  super-block scale: ``(d * scale) * q`` or ``(d * scale) * q - (dmin * min)``. The layouts are at each function.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# Views of the raw bytes as float16 / float32 / int8 take the host's byte order: ggml's is little-endian, as are
# the CPUs and GPUs torch runs on.


@dataclass(frozen=True)
class GgmlType:
    """A ggml tensor type: its name, ggml's number for it, and its block of ``block`` values in ``block_bytes``."""

    name: str
    id: int
    block: int
    block_bytes: int


_TYPES = (
    GgmlType("F32", 0, 1, 4),
    GgmlType("F16", 1, 1, 2),
    GgmlType("Q4_0", 2, 32, 18),
    GgmlType("Q4_1", 3, 32, 20),
    GgmlType("Q5_0", 6, 32, 22),
    GgmlType("Q5_1", 7, 32, 24),
    GgmlType("Q8_0", 8, 32, 34),
    GgmlType("Q2_K", 10, 256, 84),
    GgmlType("Q3_K", 11, 256, 110),
    GgmlType("Q4_K", 12, 256, 144),
    GgmlType("Q5_K", 13, 256, 176),
    GgmlType("Q6_K", 14, 256, 210),
    GgmlType("BF16", 30, 1, 2),
)
GGML_TYPES: dict[str, GgmlType] = {kind.name: kind for kind in _TYPES}
_BY_ID: dict[int, GgmlType] = {kind.id: kind for kind in _TYPES}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # stored as the values themselves


def ggml_type(name_or_id: GgmlType | str | int) -> GgmlType:
    """The supported ggml type of this name (any case) or ggml type number (gguf's GGMLQuantizationType works)."""
    if isinstance(name_or_id, GgmlType):
        return name_or_id
    if isinstance(name_or_id, str):
        found = GGML_TYPES.get(name_or_id.upper())
    elif isinstance(name_or_id, int) and not isinstance(name_or_id, bool):
        found = _BY_ID.get(int(name_or_id))
    else:
        raise TypeError(f"a ggml tensor type is a name or a type number, not {type(name_or_id).__name__}")
    if found is None:
        supported = ", ".join(f"{kind.name} ({kind.id})" for kind in _TYPES)
        what = f"name {name_or_id!r}" if isinstance(name_or_id, str) else f"number {int(name_or_id)}"
        raise ValueError(
            f"unsupported GGUF tensor type {what}: x2v dequantizes {supported}; "
            "use a GGUF file quantized to one of these (the published Wan GGUF files are)"
        )
    return found


def row_bytes(ggml: GgmlType | str | int, values: int) -> int:
    """Bytes of one row of ``values`` values of this type (``values`` is a whole number of blocks)."""
    kind = ggml_type(ggml)
    if values < 0 or values % kind.block:
        raise ValueError(f"a {kind.name} row holds whole blocks of {kind.block} values, not {values} values")
    return values // kind.block * kind.block_bytes


def dequantize(raw: torch.Tensor, ggml: GgmlType | str | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``[..., values_per_row]`` (in ``dtype``) held by GGUF tensor bytes ``raw`` (uint8
    ``[..., row_bytes]``) of type ``ggml``: computed in float32, bit-identical to ``gguf.quants.dequantize``, then cast.

    F32/F16/BF16 data asked for in its own dtype comes back as a view of ``raw`` (no copy).
    """
    kind = ggml_type(ggml)
    if not isinstance(raw, torch.Tensor):
        raise TypeError(f"GGUF tensor data is a torch uint8 tensor [..., row_bytes], not {type(raw).__name__}")
    if raw.dtype != torch.uint8:
        raise ValueError(f"GGUF tensor data is read as uint8 bytes [..., row_bytes], not {raw.dtype}")
    if raw.dim() == 0:
        raise ValueError("GGUF tensor data needs a last dimension of row bytes, not a scalar")
    if not dtype.is_floating_point:
        raise ValueError(f"dequantized values come out in a floating-point dtype, not {dtype}")
    nbytes = raw.shape[-1]
    if nbytes % kind.block_bytes:
        raise ValueError(
            f"{kind.name} data is whole {kind.block_bytes}-byte blocks of {kind.block} values, but its rows are "
            f"{nbytes} bytes: the tensor is truncated, or its type or shape is wrong"
        )
    lead = raw.shape[:-1]
    blocks_per_row = nbytes // kind.block_bytes
    values = blocks_per_row * kind.block
    if kind.name in _PLAIN:
        return _view(raw, _PLAIN[kind.name]).to(dtype)  # exact widening to float32; one rounding to a narrower dtype
    blocks = raw.reshape(math.prod(lead), blocks_per_row, kind.block_bytes)  # a view unless raw is non-contiguous
    return _DEQUANTIZE[kind.name](blocks).reshape(*lead, values).to(dtype)


def _view(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``data`` (last dim contiguous) reinterpreted as ``dtype``; a copy only where its address is misaligned
    for ``dtype`` (a slice at an odd byte offset), which torch's view refuses."""
    try:
        return data.view(dtype)
    except RuntimeError:
        return data.clone(memory_format=torch.contiguous_format).view(dtype)


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 field at byte ``offset`` of each block, as float32 ``[rows, blocks, 1]`` (exact)."""
    return _view(blocks[..., offset : offset + 2], torch.float16).float()


@functools.cache
def _shifts(device: torch.device, width: int) -> torch.Tensor:
    """The shifts to each ``width``-bit field of a byte, lowest first: uint8 ``[8 // width]`` on ``device``."""
    return torch.arange(0, 8, width, dtype=torch.uint8, device=device)


def _floats(blocks: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialized float32 result ``[rows, blocks, *shape]`` beside ``blocks``."""
    return torch.empty((*blocks.shape[:2], *shape), dtype=torch.float32, device=blocks.device)


def _nibbles(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The low nibbles of uint8 ``packed [..., n]``, then the high ones: ``[..., 2, n]``, written into ``out``
    (uint8, or float32 to convert on the way) when given. Two vectorized scalar ops, which the CPU runs several
    times faster than one shift by a broadcast tensor of shifts."""
    if out is None:
        out = packed.new_empty((*packed.shape[:-1], 2, packed.shape[-1]))
    torch.bitwise_and(packed, 0x0F, out=out.select(-2, 0))
    torch.bitwise_right_shift(packed, 4, out=out.select(-2, 1))
    return out


def _fields(packed: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The ``width``-bit fields of uint8 ``packed [..., n]``, lowest first: ``[..., 8 // width, n]``, field ``i``
    being ``(packed >> width * i) & mask``; into ``out`` (float32 converts on the way) when given."""
    shifted = packed.unsqueeze(-2) >> _shifts(packed.device, width).unsqueeze(-1)
    mask = (1 << width) - 1
    return shifted.bitwise_and_(mask) if out is None else torch.bitwise_and(shifted, mask, out=out)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """The bits of uint8 ``packed [..., n]`` in little-endian order (bit ``i`` of byte ``k`` at ``8k + i``):
    uint8 ``[..., 8n]`` of 0/1, the bits of a little-endian uint32 in order, which is how Q5_0/Q5_1 read ``qh``."""
    bits = packed.unsqueeze(-1) >> _shifts(packed.device, 1)
    return bits.bitwise_and_(1).flatten(-2)


def _signed(q: torch.Tensor, offset: int) -> torch.Tensor:
    """uint8 fields ``q`` (below 128) minus ``offset``, as int8 (in place)."""
    return q.view(torch.int8).sub_(offset)


# Each takes uint8 blocks [rows, blocks, block_bytes] and returns float32 [rows, blocks, ...] that reshapes to
# [rows, blocks, block]. The integers are made in uint8 and converted to float32 (exactly) as the last integer op
# writes them into the result, the one large allocation; the float32 ops then run in place on it, in gguf's order:
# `d * sc` first, then the product with q, then the min.


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[..., 2:].view(torch.int8).to(torch.float32).mul_(_half(blocks, 0))


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Values 0..15 minus 8 (exact in float32 as in int8)."""
    out = _floats(blocks, 32)
    _nibbles(blocks[..., 2:], out.unflatten(-1, (2, 16)))
    return out.sub_(8).mul_(_half(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    out = _floats(blocks, 32)
    _nibbles(blocks[..., 4:], out.unflatten(-1, (2, 16)))
    return out.mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _five_bits(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 values 0..31 as float32: nibbles of ``qs`` with bit ``j`` of ``qh`` as value ``j``'s 5th bit."""
    out = torch.empty(qs.shape[:-1] + (32,), dtype=torch.float32, device=qs.device)
    return torch.bitwise_or(_nibbles(qs).flatten(-2), _bits(qh).bitwise_left_shift_(4), out=out)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Values 0..31 minus 16."""
    return _five_bits(blocks[..., 2:6], blocks[..., 6:]).sub_(16).mul_(_half(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _five_bits(blocks[..., 4:8], blocks[..., 8:]).mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """``scales[16], qs[64], d, dmin``: 16 sub-blocks of 16; scale byte = min << 4 | scale. Each 32 bytes of ``qs``
    hold 128 values, 2 bits each: value ``32i + j`` is bits ``2i`` of byte ``j``. ``(d*sc) * q - (dmin*m)``."""
    scales = blocks[..., :16]
    d_scale = torch.mul(scales & 0x0F, _half(blocks, 80)).unsqueeze(-1)
    d_min = torch.mul(scales >> 4, _half(blocks, 82)).unsqueeze(-1)
    out = _floats(blocks, 16, 16)
    _fields(blocks[..., 16:80].unflatten(-1, (2, 32)), 2, out.view(*blocks.shape[:2], 2, 4, 32))
    return out.mul_(d_scale).sub_(d_min)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """``hmask[32], qs[64], scales[12], d``: 16 sub-blocks of 16 with 6-bit scales biased by 32 (low 4 bits in the
    nibbles of bytes 0..7, high 2 bits in 2-bit fields of bytes 8..11). 3-bit values: 2 low bits from ``qs`` as in
    Q2_K, and bit ``i`` of ``hmask[j]`` for value ``32i + j``, where a set bit means +0 and a clear bit -4 (the
    values are -4..3). ``(d * sc) * q``."""
    rows, count = blocks.shape[:2]
    scales = blocks[..., 96:108]
    high_scale = _fields(scales[..., 8:], 2).flatten(-2).bitwise_left_shift_(4)
    sc = _nibbles(scales[..., :8]).flatten(-2).bitwise_or_(high_scale)
    d_scale = torch.mul(_signed(sc, 32), _half(blocks, 108)).unsqueeze(-1)
    low = _fields(blocks[..., 32:96].unflatten(-1, (2, 32)), 2).reshape(rows, count, 8, 32)
    high = _fields(blocks[..., :32], 1).bitwise_left_shift_(2)  # [rows, blocks, 8, 32]
    # (low | high << 2) - 4: the low bits minus 4 where the high bit is clear, as they are where it is set.
    out = torch.bitwise_or(low, high, out=_floats(blocks, 8, 32)).sub_(4)
    return out.view(rows, count, 16, 16).mul_(d_scale)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 8 six-bit scales and mins in ``scales[12]`` at bytes 4..15, times ``d``/``dmin``: float32
    ``[rows, blocks, 8, 1]`` each. Bytes 0..3 hold scales 0..3 (low 6 bits) and the top 2 bits of scales 4..7;
    bytes 4..7 the same for the mins; bytes 8..11 the low 4 bits of scale (low nibble) and min (high) 4..7."""
    packed = blocks[..., 4:16]
    sc_low, min_low, both = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat([sc_low & 0x3F, (both & 0x0F) | ((sc_low >> 2) & 0x30)], dim=-1)
    mins = torch.cat([min_low & 0x3F, (both >> 4) | ((min_low >> 2) & 0x30)], dim=-1)
    d_scale = torch.mul(sc, _half(blocks, 0)).unsqueeze(-1)
    d_min = torch.mul(mins, _half(blocks, 2)).unsqueeze(-1)
    return d_scale, d_min


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """``d, dmin, scales[12], qs[128]``: 8 sub-blocks of 32; each 32 bytes of ``qs`` hold two sub-blocks, the low
    nibbles then the high ones. ``(d * sc) * q - (dmin * m)``."""
    d_scale, d_min = _k_scales(blocks)
    out = _floats(blocks, 8, 32)
    _nibbles(blocks[..., 16:].unflatten(-1, (4, 32)), out.view(*blocks.shape[:2], 4, 2, 32))
    return out.mul_(d_scale).sub_(d_min)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """``d, dmin, scales[12], qh[32], qs[128]``: Q4_K with a 5th bit, bit ``i`` of ``qh[j]`` for value ``32i + j``."""
    rows, count = blocks.shape[:2]
    d_scale, d_min = _k_scales(blocks)
    low = _nibbles(blocks[..., 48:].unflatten(-1, (4, 32))).view(rows, count, 8, 32)
    high = _fields(blocks[..., 16:48], 1).bitwise_left_shift_(4)  # [rows, blocks, 8, 32]
    out = torch.bitwise_or(low, high, out=_floats(blocks, 8, 32))
    return out.mul_(d_scale).sub_(d_min)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """``ql[128], qh[64], scales[16] int8, d``: 16 sub-blocks of 16; per 128 values, 64 bytes of ``ql`` (low
    nibbles: values 0..63, high nibbles: 64..127) and 32 of ``qh`` (2-bit field ``i`` of byte ``j``: value
    ``32i + j``'s top bits). Values 0..63 minus 32; ``(d * sc) * q``."""
    rows, count = blocks.shape[:2]
    d_scale = torch.mul(blocks[..., 192:208].view(torch.int8), _half(blocks, 208)).unsqueeze(-1)
    low = _nibbles(blocks[..., :128].unflatten(-1, (2, 64))).view(rows, count, 8, 32)
    high = _fields(blocks[..., 128:192].unflatten(-1, (2, 32)), 2).reshape(rows, count, 8, 32).bitwise_left_shift_(4)
    out = torch.bitwise_or(low, high, out=_floats(blocks, 8, 32)).sub_(32)
    return out.view(rows, count, 16, 16).mul_(d_scale)


_DEQUANTIZE = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
