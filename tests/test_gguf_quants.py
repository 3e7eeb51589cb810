"""x2v's GGUF dequantization (``x2v.ops.gguf_quants``) against gguf-py's numpy reference (``gguf.quants``): the
float32 values must be the same bit for bit, for random blocks of every supported type and for gguf's own
quantization of random weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from x2v.ops.gguf_quants import GGML_TYPES, GgmlType, dequantize, ggml_type, row_bytes

QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
PLAIN = ["F32", "F16", "BF16"]
GGUF_QUANTIZES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # the types gguf-py can quantize to

# Byte offsets of each block's float16 scales (d, and dmin / m where there is one): random bytes there could be
# NaN or infinity, so the tests put finite float16 values there.
HALF_FIELDS = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
# Scales to include: zeros of both signs, the smallest subnormal, the smallest normal, the largest finite value.
SPECIAL_HALVES = np.array([0.0, -0.0, 2.0**-24, -(2.0**-24), 2.0**-14, 65504.0, -65504.0], dtype=np.float16)
# Bit patterns to include in F32/F16/BF16 data: +-infinity, a quiet and a signaling NaN, the smallest subnormal, -0.
SPECIAL_BITS = {
    "F32": np.array([0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0x00000001, 0x80000000], dtype="<u4"),
    "F16": np.array([0x7C00, 0xFC00, 0x7E01, 0x7C01, 0x0001, 0x8000], dtype="<u2"),
    "BF16": np.array([0x7F80, 0xFF80, 0x7FC1, 0x7F81, 0x0001, 0x8000], dtype="<u2"),
}


def random_rows(name: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    """``rows`` rows of ``blocks`` random blocks of type ``name`` (uint8), float16 scales finite."""
    kind = GGML_TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks * kind.block_bytes), dtype=np.uint8)
    view = raw.reshape(rows, blocks, kind.block_bytes)
    for offset in HALF_FIELDS.get(name, ()):
        # Magnitudes across float16's whole range (subnormals included), then some special values.
        halves = (rng.uniform(-1, 1, (rows, blocks)) * 2.0 ** rng.integers(-25, 16, (rows, blocks))).astype(np.float16)
        halves.reshape(-1)[: len(SPECIAL_HALVES)] = SPECIAL_HALVES[: halves.size]
        view[..., offset : offset + 2] = halves.view(np.uint8).reshape(rows, blocks, 2)
    if name in SPECIAL_BITS:
        special = SPECIAL_BITS[name].view(np.uint8)[: raw.shape[1]]
        raw[0, : len(special)] = special
    return raw


def reference(raw: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(raw, gguf.GGMLQuantizationType[name])))


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, nan_payloads: bool = True) -> None:
    """Equal bit for bit; with ``nan_payloads=False``, NaNs need only be NaNs in the same places."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    bits = {4: torch.int32, 2: torch.int16}[got.element_size()]
    if not nan_payloads:
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        got, want = got.masked_fill(nan, 0), want.masked_fill(nan, 0)
    assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))


def test_type_table_matches_gguf():
    assert sorted(GGML_TYPES) == sorted(QUANTIZED + PLAIN)
    for name, kind in GGML_TYPES.items():
        gguf_type = gguf.GGMLQuantizationType[name]
        assert kind.name == name and kind.id == gguf_type.value
        assert (kind.block, kind.block_bytes) == gguf.GGML_QUANT_SIZES[gguf_type]
        assert ggml_type(name) is kind and ggml_type(name.lower()) is kind
        assert ggml_type(kind.id) is kind and ggml_type(gguf_type) is kind and ggml_type(kind) is kind


def test_row_bytes():
    for name, kind in GGML_TYPES.items():
        gguf_type = gguf.GGMLQuantizationType[name]
        assert row_bytes(kind, 5120) == quants.quant_shape_to_byte_shape((5120,), gguf_type)[0]
    assert row_bytes("Q4_K", 5120) == 20 * 144
    with pytest.raises(ValueError, match="whole blocks of 256 values, not 100"):
        row_bytes("Q4_K", 100)


@pytest.mark.parametrize("bad", ["IQ2_XXS", "Q8_K", "q4", 16, gguf.GGMLQuantizationType.Q8_1, 99])
def test_unsupported_type_names_the_supported_ones(bad):
    with pytest.raises(ValueError, match="unsupported GGUF tensor type") as raised:
        ggml_type(bad)
    assert "Q4_K (12)" in str(raised.value) and "BF16 (30)" in str(raised.value)
    with pytest.raises(ValueError, match="unsupported GGUF tensor type"):
        dequantize(torch.zeros(1, 32, dtype=torch.uint8), bad)
    with pytest.raises(TypeError, match="a name or a type number"):
        ggml_type(1.0)


def test_bad_data_is_refused_clearly():
    with pytest.raises(ValueError, match=r"Q4_0 data is whole 18-byte blocks of 32 values, but its rows are 19 bytes"):
        dequantize(torch.zeros(2, 19, dtype=torch.uint8), "Q4_0")
    with pytest.raises(ValueError, match="F32 data is whole 4-byte blocks"):
        dequantize(torch.zeros(2, 6, dtype=torch.uint8), "F32")
    with pytest.raises(ValueError, match="uint8 bytes"):
        dequantize(torch.zeros(2, 18, dtype=torch.int8), "Q4_0")
    with pytest.raises(TypeError, match="a torch uint8 tensor"):
        dequantize(np.zeros((2, 18), dtype=np.uint8), "Q4_0")
    with pytest.raises(ValueError, match="not a scalar"):
        dequantize(torch.tensor(0, dtype=torch.uint8), "Q4_0")
    with pytest.raises(ValueError, match="floating-point dtype"):
        dequantize(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", dtype=torch.int32)


@pytest.mark.parametrize("rows", [3, 1])
@pytest.mark.parametrize("name", QUANTIZED)
def test_random_blocks_match_gguf(name, rows):
    raw = random_rows(name, rows, blocks=3, seed=rows)
    got = dequantize(torch.from_numpy(raw), name)
    assert got.shape == (rows, 3 * GGML_TYPES[name].block)
    assert_same_bits(got, reference(raw, name))


@pytest.mark.parametrize("name", PLAIN)
def test_plain_types_match_gguf(name):
    """Random bytes (any bit pattern) and infinities, NaNs and subnormals. torch's float16 -> float32 conversion
    quiets (or canonicalizes) NaNs where numpy keeps their bits, so float16 NaNs only match as NaNs."""
    raw = random_rows(name, 4, blocks=512)
    got = dequantize(torch.from_numpy(raw), name)
    want = reference(raw, name)
    assert want.isnan().any() and want.isinf().any()
    assert_same_bits(got, want, nan_payloads=name != "F16")


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_weights_quantized_by_gguf(name):
    rng = np.random.default_rng(1)
    weights = (rng.standard_normal((4, 512)) * 0.05).astype(np.float32)
    weights[0, :64] = 0  # all-zero blocks: a zero scale
    raw = quants.quantize(weights, gguf.GGMLQuantizationType[name]).view(np.uint8)
    got = dequantize(torch.from_numpy(raw), name)
    assert_same_bits(got, reference(raw, name))
    assert torch.allclose(got, torch.from_numpy(weights), atol=0.05 * 4 / 7)  # within a coarse step of 4-bit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", QUANTIZED + PLAIN)
def test_narrow_output_is_the_float32_result_cast(name, dtype):
    raw = random_rows(name, 2, blocks=64 if name in PLAIN else 2)
    got = dequantize(torch.from_numpy(raw), ggml_type(name), dtype=dtype)
    assert_same_bits(got, reference(raw, name).to(dtype), nan_payloads=False)


def test_shapes_leading_dims_and_empty():
    kind = GGML_TYPES["Q5_K"]
    raw = random_rows("Q5_K", 6, blocks=2)
    want = reference(raw, "Q5_K")
    assert_same_bits(dequantize(torch.from_numpy(raw).reshape(2, 3, -1), kind), want.reshape(2, 3, -1))
    assert_same_bits(dequantize(torch.from_numpy(raw[0]), kind), want[0])
    assert dequantize(torch.zeros(0, 2 * kind.block_bytes, dtype=torch.uint8), kind).shape == (0, 512)
    assert dequantize(torch.zeros(3, 0, dtype=torch.uint8), kind).shape == (3, 0)


@pytest.mark.parametrize("name", QUANTIZED + PLAIN)
def test_misaligned_and_strided_data(name):
    """Rows inside a wider buffer at an odd byte offset (the float16 fields cannot be viewed in place there)."""
    raw = random_rows(name, 3, blocks=2 if name in QUANTIZED else 8)
    wide = torch.zeros(3, raw.shape[1] + 3, dtype=torch.uint8)
    wide[:, 1 : 1 + raw.shape[1]] = torch.from_numpy(raw)
    strided = wide[:, 1 : 1 + raw.shape[1]]
    assert strided.storage_offset() % 2 == 1 and not strided.is_contiguous()
    want = reference(raw, name)
    assert_same_bits(dequantize(strided, name), want, nan_payloads=name != "F16")
    column_major = torch.from_numpy(raw).t().contiguous().t()
    assert_same_bits(dequantize(column_major, name), want, nan_payloads=name != "F16")


def test_plain_data_in_its_own_dtype_is_a_view():
    raw = torch.from_numpy(random_rows("F16", 2, blocks=8))
    assert dequantize(raw, "F16", dtype=torch.float16).data_ptr() == raw.data_ptr()


def test_known_blocks():
    """Bit orders by hand: Q4_0's low nibbles are values 0..15; Q5_0's qh is a little-endian uint32 of 5th bits."""
    half = np.array([0.5], dtype=np.float16).view(np.uint8)
    q4 = np.concatenate([half, np.full(16, 0x9F, dtype=np.uint8)])  # low nibble 15, high nibble 9
    values = dequantize(torch.from_numpy(q4), GgmlType("Q4_0", 2, 32, 18))
    assert values.tolist() == [3.5] * 16 + [0.5] * 16  # (15 - 8) / 2, (9 - 8) / 2
    qh = np.array([1 << 0 | 1 << 17], dtype="<u4").view(np.uint8)  # 5th bits of values 0 and 17
    q5 = np.concatenate([half, qh, np.zeros(16, dtype=np.uint8)])
    values = dequantize(torch.from_numpy(q5), "Q5_0")
    assert values[0] == values[17] == 0.0 and values[1] == values[16] == -8.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", QUANTIZED + PLAIN)
def test_cuda_matches_gguf(name):
    raw = random_rows(name, 5, blocks=4 if name in QUANTIZED else 256)
    got = dequantize(torch.from_numpy(raw).cuda(), name)
    assert got.is_cuda
    assert_same_bits(got.cpu(), reference(raw, name), nan_payloads=name != "F16")
    narrow = dequantize(torch.from_numpy(raw).cuda(), name, dtype=torch.bfloat16)
    assert_same_bits(narrow.cpu(), reference(raw, name).to(torch.bfloat16), nan_payloads=False)
