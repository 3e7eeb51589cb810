"""cudnn_fp8: cuDNN's fp8 attention. The kernel needs a GPU (`benchmarks/gpu_check.py` runs it there); here: the
quantization, the scales x2v hands cuDNN (through an emulation of cuDNN's arithmetic, against float32 attention)
and the graph, built and validated by NVIDIA's frontend for Wan's shapes."""

from __future__ import annotations

import math

import pytest
import torch

from x2v.ops.attention import sdpa

pytest.importorskip("cudnn", reason="NVIDIA's cuDNN frontend is not installed: pip install --no-deps "
                                    "nvidia-cudnn-frontend (README's test command does)")
from x2v.ops.cudnn_fp8 import FP8, FP8_MAX, make_graph, output_scales, quantize  # noqa: E402


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def qkv(seed: int, q_len: int = 96, kv_len: int = 80, heads: int = 2, head_dim: int = 64, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, heads, head_dim, generator=g) for n in (q_len, kv_len, kv_len))
    return q, k + offset * torch.randn(1, 1, heads, head_dim, generator=g), v


@pytest.mark.parametrize("center", [False, True])
def test_quantize_one_scale_per_tensor(center):
    x = qkv(0, offset=3.0)[1] * 5
    x8, scale = quantize(x, center)
    assert x8.dtype == FP8 and x8.shape == x.shape and scale.shape == (1, 1, 1, 1)
    want = x - x.mean(1, keepdim=True) if center else x
    assert torch.isclose(x8.float().abs().max(), torch.tensor(FP8_MAX))  # the largest value lands on fp8's largest
    assert torch.allclose(x8.float() * scale, want, rtol=2 ** -4, atol=2 ** -9 * scale.item())  # half an fp8 step
    assert quantize(torch.zeros(1, 3, 1, 4), center)[0].float().eq(0).all()  # zeros, not NaN


def emulated_cudnn(q, k, v, fp8_output: bool) -> torch.Tensor:
    """cuDNN's fp8 attention in torch, as x2v drives it: operands and scales from x2v's functions, fp32
    accumulation, P rounded to fp8 after scaling by 448, the row sums taken before rounding, O rounded to fp8 with
    the output scale (Hopper) or not (Blackwell)."""
    (q8, sq), (k8, sk), (v8, sv) = quantize(q, False), quantize(k, True), quantize(v, False)
    s = torch.einsum("blhd,bmhd->bhlm", q8.float(), k8.float()) * (sq * sk / math.sqrt(q.shape[-1]))
    p = (s - s.amax(-1, keepdim=True)).exp()
    p8 = (p * FP8_MAX).to(FP8).float() / FP8_MAX
    o = torch.einsum("bhlm,bmhd->blhd", p8, v8.float()) * sv / p.sum(-1).transpose(1, 2)[..., None]
    if fp8_output:
        scale_o, o_descale = output_scales(sv)
        o8 = (o * scale_o).to(FP8)
        assert o8.float().abs().max() <= FP8_MAX / 2 * 1.1  # the headroom holds: nothing near fp8's top, no NaN
        o = o8.float() * o_descale
    return o


@pytest.mark.parametrize("fp8_output", [True, False])
def test_scales_give_softmax_attention_within_fp8_precision(fp8_output):
    for seed, offset in ((1, 0.0), (2, 4.0)):  # keys with a large shared offset: centering removes it exactly
        q, k, v = qkv(seed, offset=offset)
        err = relative_l2(emulated_cudnn(q, k, v, fp8_output), sdpa(q, k, v))
        # fp8 e4m3 rounds each value by up to 2^-4 relative (about 5 % here, most of it from Q and K; the
        # rounded output adds a little); a wrong scale would be far off
        assert err < (0.065 if fp8_output else 0.06), (seed, err)


@pytest.mark.parametrize("kv_len", [32760, 512])  # Wan 14B at 480P: self- and cross-attention
@pytest.mark.parametrize("sm_version, out_dtype", [(90, FP8), (100, torch.bfloat16)])
def test_graph_validates_for_wan_shapes(kv_len, sm_version, out_dtype):
    """The frontend accepts the graph x2v builds (operands in x2v's [B, L, H, D] layout); planning it needs a GPU."""
    def meta(tokens, dtype=FP8):
        return torch.empty(1, tokens, 40, 128, dtype=dtype, device="meta")

    graph = make_graph(meta(32760), meta(kv_len), meta(kv_len), meta(32760, out_dtype), sm_version=sm_version)
    assert set(graph.tensors) == {"q", "k", "v", "o", "amax_s", "amax_o", "descale_q", "descale_k", "descale_v",
                                  "descale_s", "scale_s", "scale_o"}
    assert list(graph.tensors["k"].dim) == [1, 40, kv_len, 128]
    assert list(graph.tensors["k"].stride) == [kv_len * 40 * 128, 128, 40 * 128, 1]  # heads interleaved per token
