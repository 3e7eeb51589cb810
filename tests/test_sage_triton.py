"""x2v's 8-bit attention kernel (``sage_triton``), run on the CPU by Triton's interpreter, against float32 SDPA."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import x2v
from ckpt_utils import relative_l2
from x2v.demo import write_tiny_model
from x2v.ops import attention as attn

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _count_to(out, n):
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out, total)


@pytest.fixture(scope="module")
def sage():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest.py: the kernels run on the CPU
    count = torch.zeros(1, dtype=torch.int32)
    try:
        _count_to[(1,)](count, 3)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Triton's interpreter fails here ({e}); Triton < 3.7 with numpy >= 2.4: pip install 'triton>=3.7'")
    assert count.item() == 3
    return importlib.import_module("x2v.ops.sage_triton")


def qkv(batch, q_len, kv_len, heads, head_dim, dtype, seed=0, offsets=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=g) for n in (q_len, kv_len, kv_len))
    if offsets:  # as real keys and values have: smoothing K and V must remove them before quantizing
        k = k + 4 * torch.randn(1, 1, heads, head_dim, generator=g)
        v = v + 3 * torch.randn(1, 1, heads, head_dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


SHAPES = [(1, 150, 100, 2, 64),  # neither length a multiple of the blocks
          (2, 64, 96, 3, 32),  # lengths that need no padding
          (1, 40, 7, 1, 128)]  # fewer keys than a block (text tokens), Wan's head dim


@pytest.mark.parametrize("batch, q_len, kv_len, heads, head_dim", SHAPES)
def test_qk_part_is_exact_attention_of_the_quantized_q_and_k(sage, batch, q_len, kv_len, heads, head_dim):
    """With P·V in half precision the kernel is softmax attention of the dequantized int8 Q and K: only P's
    rounding to float16 differs (float16: Triton's interpreter gets bfloat16 matmuls wrong)."""
    q, k, v = qkv(batch, q_len, kv_len, heads, head_dim, torch.float16)
    tiling = sage.Tiling(32, 32, 1, 1)
    q8, q_scale = sage.quantize_q(q, tiling.block_m)
    k8, k_scale = sage.quantize_k(k, tiling.block_n)
    logits2 = (q8.float() * q_scale[..., None]) @ (k8.unflatten(2, (-1, 32)).float()
                                                   * k_scale[..., None, None]).flatten(2, 3).transpose(-1, -2)
    probs = torch.softmax(logits2[:, :, :q_len, :kv_len] * math.log(2), -1)  # the scale carries log2(e)
    want = (probs @ v.transpose(1, 2).float()).transpose(1, 2)
    out = sage.sage_attention(q, k, v, tiling, pv_fp8=False)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_l2(out, want) < 2e-3
    exact = attn.sdpa(q.float(), k.float(), v.float())
    assert relative_l2(out, exact) < 3e-2  # int8 Q and K: about 1e-2 for random inputs


@pytest.mark.parametrize("batch, q_len, kv_len, heads, head_dim", SHAPES)
def test_fp8_pv_error_is_that_of_fp8_rounding(sage, batch, q_len, kv_len, heads, head_dim):
    """fp8 e4m3 keeps 3 mantissa bits: P and V each rounded by ~2.5 % (RMS) give ~4 % on the output of random
    inputs, whose values' mean is zero (~6.5 % here: the interpreter's fp8 conversion rounds some values to the
    wrong neighbour); the values' mean is subtracted before rounding and added back exactly, so with real-like
    offsets the error is far smaller."""
    tiling = sage.Tiling(32, 32, 1, 1)
    for offsets, bound in ((False, 1e-1), (True, 1.5e-2)):
        q, k, v = qkv(batch, q_len, kv_len, heads, head_dim, torch.bfloat16, offsets=offsets)
        out = sage.sage_attention(q, k, v, tiling)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert relative_l2(out, attn.sdpa(q.float(), k.float(), v.float())) < bound


def test_precision_options_order_as_expected(sage):
    """int8 Q·K is exact (errors only from rounding Q and K), fp8 Q·K is not; P·V in half precision is closer than
    in fp8."""
    q, k, v = qkv(1, 96, 80, 2, 64, torch.float16, offsets=False)
    want = attn.sdpa(q.float(), k.float(), v.float())
    error = {(qk, pv): relative_l2(sage.sage_attention(q, k, v, sage.Tiling(32, 32, 1, 1), qk, pv), want)
             for qk in (torch.int8, sage.FP8) for pv in (True, False)}
    assert error[torch.int8, False] < error[sage.FP8, False] < error[sage.FP8, True] < 1.2e-1
    assert error[torch.int8, False] < error[torch.int8, True] < error[sage.FP8, True]


def test_tilings_agree(sage):
    q, k, v = qkv(1, 70, 90, 1, 32, torch.bfloat16, seed=1)
    a = sage.sage_attention(q, k, v, sage.Tiling(16, 32, 1, 1)).float()
    b = sage.sage_attention(q, k, v, sage.Tiling(64, 16, 1, 1)).float()
    assert relative_l2(a, b) < 2e-2  # only the K blocks' scales differ


def test_quantized_tensors_round_trip(sage):
    q, k, v = qkv(2, 50, 70, 2, 32, torch.bfloat16)
    q8, q_scale = sage.quantize_q(q, 32)
    assert q8.dtype == torch.int8 and q8.shape == (2, 2, 64, 32) and not q8[:, :, 50:].any()
    softmax_factor = sage.LOG2_E / 32 ** 0.5
    back = q8[:, :, :50].float() * q_scale[:, :, :50, None] / softmax_factor
    assert relative_l2(back, q.transpose(1, 2).float()) < 1e-2
    k8, k_scale = sage.quantize_k(k, 32)
    assert k8.shape == (2, 2, 96, 32) and k_scale.shape == (2, 2, 3)
    smoothed = k.transpose(1, 2).float() - k.transpose(1, 2).float().mean(2, keepdim=True)
    back = (k8.unflatten(2, (3, 32)).float() * k_scale[..., None, None]).flatten(2, 3)[:, :, :70]
    assert relative_l2(back, smoothed) < 2e-2
    v8, v_scale, v_mean = sage.quantize_v(v, 32)
    assert v8.dtype == sage.FP8 and v8.shape == (2, 2, 32, 96) and v8.is_contiguous()
    back = v8[..., :70].float().transpose(2, 3) * v_scale[:, :, None] + v_mean[:, :, None]
    assert relative_l2(back, v.transpose(1, 2).float()) < 5e-2
    # Lengths that need no padding: still the kernel's contiguous [B, H, L, D] layout, not a transposed view.
    assert sage.quantize_q(q[:, :32], 32)[0].is_contiguous() and sage.quantize_k(k[:, :64], 32)[0].is_contiguous()


def test_bad_head_dim_is_refused(sage):
    q = torch.randn(1, 8, 1, 24, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="power of two"):
        sage.sage_attention(q, q, q)


def test_dit_with_sage_triton_attention(sage, tmp_path, monkeypatch):
    """The attention type by LightX2V's keys, in a bf16 DiT (head dim 128 like Wan's), close to the SDPA run;
    inside compiled blocks (use_compile) the kernel runs between two graphs, with the same result."""
    from x2v.pipelines.wan import compile_blocks

    monkeypatch.setattr(attn, "KERNEL_DEVICES", ("cpu",))
    monkeypatch.setattr(attn, "failed_types", set())
    attn.kernel.cache_clear()
    model = x2v.load_dit(write_tiny_model(tmp_path / "t2v", "t2v"), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, model.config.in_dim, 3, 8, 8, generator=g), torch.tensor([650.0])
    context = torch.randn(1, 20, model.config.text_dim, generator=g)
    with torch.no_grad():
        want = model(x, t, context)
        model.set_attention("sage_triton", "sage_triton", "sage_triton")
        got = model(x, t, context)
        compile_blocks(model, "cpu")
        compiled = model(x, t, context)
    assert relative_l2(got, want.float()) < 2e-2
    assert relative_l2(compiled, got.float()) < 2e-3 and not attn.failed_types
    attn.kernel.cache_clear()


def test_a_failing_kernel_falls_back_once(monkeypatch, caplog):
    calls = []

    def broken(q, k, v):
        calls.append(1)
        raise RuntimeError("no kernel image for this card")

    monkeypatch.setattr(attn, "KERNEL_DEVICES", ("cpu",))
    monkeypatch.setattr(attn, "failed_types", set())
    monkeypatch.setattr(attn, "kernel", lambda name: broken)
    q = torch.randn(1, 5, 2, 16, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        outs = [attn.attention(q, q, q, "sage_triton") for _ in range(3)]
    assert all(torch.equal(o, attn.sdpa(q, q, q)) for o in outs)
    assert len(calls) == 1 and sum("failed" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("arch", [90, 89, 80])
def test_kernel_builds_with_8bit_tensor_cores_and_no_spills(tmp_path, arch):
    """The real compile for Hopper (sm_90), Ada (sm_89) and Ampere (sm_80, no fp8: P·V in bf16) with the tiling
    sage_attention picks there; no GPU needed (Triton's wheel carries ptxas): int8 / fp8 tensor-core instructions,
    key and value tiles loaded ahead by the software pipeline, no spilled registers."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no CUDA compiler")
    report = tmp_path / "build.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[1] / "benchmarks" / "triton_build.py"
    subprocess.run([sys.executable, script, "--arch", str(arch), "--kernels", "sage", "--tilings", "default",
                    "--kv-lens", "32760", "--json", report], env=env, check=True, capture_output=True)
    builds = {(b["qk"], b["pv"]): b for b in json.loads(report.read_text())}
    expected = {("int8", "fp8"), ("float8_e4m3fn", "fp8"), ("int8", "bf16")} if arch >= 89 else {("int8", "bf16")}
    assert set(builds) == expected
    instruction = "wgmma.mma_async" if arch >= 90 else "mma.sync"
    for (qk, pv), build in builds.items():
        assert build["spill_bytes"] == 0 and build["shared_bytes"] <= 227 * 1024, build
        qk_mma = "s32.s8.s8" if qk == "int8" else "f32.e4m3.e4m3"
        pv_mma = "f32.e4m3.e4m3" if pv == "fp8" else "f32.bf16.bf16"
        assert any(m.startswith(instruction) and qk_mma in m for m in build["mma"]), build
        assert any(m.startswith(instruction) and pv_mma in m for m in build["mma"]), build
        tiles = {dtype for _, dtype in build["pipelined_tiles"]}
        assert {"i8" if qk == "int8" else "f8E4M3FN", "f8E4M3FN" if pv == "fp8" else "bf16"} <= tiles, build
