"""cudnn_fp8: cuDNN's fp8 attention. Running cuDNN needs a GPU (tests/test_gpu.py checks it there, `pytest -m gpu`); here:
the quantization, x2v's whole side of a call with cuDNN's arithmetic emulated (against float32 attention), and the
graph, built and validated by NVIDIA's frontend for Wan's shapes."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from ckpt_utils import relative_l2

from x2v.ops import attention
from x2v.ops.attention import sdpa
from x2v.ops.quant_math import Fp8Query

pytest.importorskip("cudnn", reason="NVIDIA's cuDNN frontend is not installed: pip install --no-deps "
                                    "nvidia-cudnn-frontend (README's test command does)")
from x2v.ops import cudnn_fp8  # noqa: E402
from x2v.ops.cudnn_fp8 import FP8, FP8_MAX, make_graph, quantize  # noqa: E402


def qkv(seed: int, q_len: int = 96, kv_len: int = 80, heads: int = 2, head_dim: int = 64, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, heads, head_dim, generator=g) for n in (q_len, kv_len, kv_len))
    k_offset, v_offset = (offset * torch.randn(1, 1, heads, head_dim, generator=g) for _ in range(2))
    return q, k + k_offset, v + v_offset


@pytest.mark.parametrize("center", [False, True])
def test_quantize_one_scale_per_tensor(center):
    x = qkv(0, offset=3.0)[1] * 5
    x8, scale, mean = quantize(x, center)
    assert x8.dtype == FP8 and x8.shape == x.shape and scale.shape == (1, 1, 1, 1)
    assert (mean is None) if not center else torch.allclose(mean, x.mean(1, keepdim=True))
    want = x - x.mean(1, keepdim=True) if center else x
    assert torch.isclose(x8.float().abs().max(), torch.tensor(FP8_MAX))  # the largest value lands on fp8's largest
    assert scale.item() == (want.abs().amax() / FP8_MAX).item()  # exactly: max |x - mean| found without x - mean
    assert torch.allclose(x8.float() * scale, want, rtol=2 ** -4, atol=2 ** -9 * scale.item())  # half an fp8 step
    assert quantize(torch.zeros(1, 3, 1, 4), center)[0].float().eq(0).all()  # zeros, not NaN


def emulated_execute(graph, data):
    """cuDNN's fp8 attention as its documentation defines it, on the operands x2v hands it: S = Q·Kᵀ times the
    Q and K descales and the attention scale, fp32 softmax with P = exp(S - max) scaled by scale_s and rounded to
    fp8, O = P·V times the S and V descales over the row sums, times scale_o, rounded to the output's dtype."""
    q, k, v = (data[name].float() for name in "qkv")
    s = torch.einsum("blhd,bmhd->bhlm", q, k) * (data["descale_q"] * data["descale_k"] / math.sqrt(q.shape[-1]))
    p = (s - s.amax(-1, keepdim=True)).exp()
    p8 = (p * data["scale_s"]).to(FP8).float()
    o = torch.einsum("bhlm,bmhd->blhd", p8, v) * (data["descale_s"] * data["descale_v"])
    o = o / p.sum(-1).transpose(1, 2)[..., None] * data["scale_o"]
    assert o.abs().max() <= FP8_MAX  # the output scale leaves headroom: nothing saturates
    data["o"].copy_(o.to(data["o"].dtype))


def emulate_cudnn(monkeypatch, capability: list[tuple[int, int]], on_cpu: bool = False) -> None:
    """cudnn_fp8 on a card of ``capability[0]`` (changeable), cuDNN's part emulated; ``on_cpu``: attention() runs
    it for CPU tensors."""
    monkeypatch.setattr(cudnn_fp8, "capability", lambda device: capability[0])
    monkeypatch.setattr(cudnn_fp8, "planned", lambda *operands: None)
    monkeypatch.setattr(cudnn_fp8, "execute", emulated_execute)
    if on_cpu:
        monkeypatch.setattr(attention, "KERNEL_DEVICES", ("cpu",))
        monkeypatch.setattr(attention, "failed_types", set())
        attention.kernel.cache_clear()


@pytest.mark.parametrize("capability, bound", [((9, 0), 0.065), ((10, 0), 0.06)])  # fp8 output; bf16 output
def test_attention_within_fp8_precision_of_softmax_attention(monkeypatch, capability, bound):
    """x2v's side of cudnn_fp8 (quantization, scales, variant pack, the fp8 output's conversion) end to end, with
    cuDNN's part emulated: a wrong or swapped scale would be far off."""
    emulate_cudnn(monkeypatch, [capability])
    # Keys and values with a large offset shared by all tokens (as a DiT's have): centering removes it exactly.
    # Left in V it would take most of fp8's range, and its rounding error would go into every output row alike:
    # 2.4-2.8e-2 here instead of 2.8e-3.
    for seed, offset, case_bound in ((1, 0.0, bound), (2, 4.0, 1e-2)):
        q, k, v = (x.to(torch.bfloat16) for x in qkv(seed, offset=offset))
        out = cudnn_fp8.cudnn_fp8_attention(q, k, v)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        # fp8 e4m3 rounds each value by up to 2^-4 relative: about 5 % here, most of it from Q and K (docs)
        want = sdpa(q.float(), k.float(), v.float())
        err = relative_l2(out, want)
        assert err < case_bound, (seed, err)
        # Q already in fp8 with a scale 30 times its largest value (as the RMS norm's static bound gives it):
        # fp8 is a floating-point type, so the headroom costs nothing but range at the bottom
        scale = (q.float().abs().amax() * 30 / FP8_MAX).reshape(1, 1, 1, 1)
        out = cudnn_fp8.cudnn_fp8_attention(Fp8Query((q.float() / scale).to(FP8), scale), k, v)
        assert out.dtype == torch.bfloat16 and relative_l2(out, want) < err * 1.1, (relative_l2(out, want), err)


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


def test_older_cards_are_refused_before_any_work(monkeypatch, caplog):
    """Before Hopper cuDNN has no fp8 attention: the call says so, and attention() runs SDPA instead, once told."""
    emulate_cudnn(monkeypatch, [(8, 6)], on_cpu=True)
    monkeypatch.setattr(cudnn_fp8, "execute", lambda graph, data: pytest.fail("cuDNN was called"))
    q, k, v = (x.to(torch.bfloat16) for x in qkv(3))
    with pytest.raises(RuntimeError, match="needs a Hopper or newer GPU .* this one is 8.6: use sage_triton"):
        cudnn_fp8.cudnn_fp8_attention(q, k, v)
    assert attention.takes_fp8_query("cudnn_fp8", v)  # the DiT's norms would write Q in fp8 for it
    q8 = Fp8Query(q.to(FP8), torch.ones(1, 1, 1, 1))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(attention.attention(q8, k, v, "cudnn_fp8"), sdpa(q.to(FP8).bfloat16(), k, v))
        assert torch.equal(attention.attention(q, k, v, "cudnn_fp8"), sdpa(q, k, v))
    assert sum("cudnn_fp8 failed" in r.getMessage() for r in caplog.records) == 1
    assert not attention.takes_fp8_query("cudnn_fp8", v)  # the norms write Q in bf16 again


def test_fp8_output_goes_to_the_fp8_o_projection_as_it_is(tmp_path, monkeypatch):
    """On Hopper the self-attention's output projection of an fp8 model takes cuDNN's fp8 output and its one scale
    as they are (no conversion to 16 bits and quantization back), and Q comes from its RMS norm in fp8 with the
    norm's static scale (no pass over Q for its largest value); the whole forward stays within fp8 rounding of the
    path that does neither, which ``unfused()`` runs. Blackwell (16-bit output) converts the output, with Q
    still from the norm in fp8."""
    from test_attention_compile import inputs

    import x2v
    from x2v.demo import write_tiny_model
    from x2v.ops.fused import unfused
    from x2v.ops.quant_linear import set_quant_mode
    from x2v.pipelines.wan import compile_blocks

    capability = [(9, 0)]
    emulate_cudnn(monkeypatch, capability, on_cpu=True)
    calls, conversions = [], []
    real_attend, real_restore = cudnn_fp8.attend, cudnn_fp8.restore
    monkeypatch.setattr(cudnn_fp8, "attend", lambda *a: calls.append(isinstance(a[0], Fp8Query)) or real_attend(*a))
    monkeypatch.setattr(cudnn_fp8, "restore", lambda *a: conversions.append(1) or real_restore(*a))
    model = x2v.load_dit(write_tiny_model(tmp_path / "t2v", "t2v"), dit_quantized=True, quant_scheme="fp8-vllm")
    set_quant_mode(model, "w8a8")
    model.set_attention("cudnn_fp8")
    x, t, context = inputs(model)
    with torch.no_grad():
        got = model(x, t, context)
        blocks = len(model.blocks)
        assert calls == [True] * blocks and not conversions  # every output projection took the fp8 values
        with unfused():
            want = model(x, t, context)
        assert calls[blocks:] == [False] * blocks and len(conversions) == blocks  # Q in bf16, quantized by attend
        compile_blocks(model, "cpu")  # use_compile: the hand-over between the compiled graphs
        torch.testing.assert_close(model(x, t, context), got, rtol=1e-2, atol=1e-2)
        assert calls[2 * blocks:] == [True] * blocks and len(conversions) == blocks
        capability[0] = (10, 0)
        model(x, t, context)
    assert calls[3 * blocks:] == [True] * blocks and len(conversions) == 2 * blocks  # bf16 from cuDNN: converted
    # 3.7e-3 when written (3.5e-3 before Q came in fp8 from the norm)
    assert 0 < relative_l2(got, want) < 1e-2, relative_l2(got, want)
