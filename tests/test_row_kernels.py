"""x2v's one-pass Triton row kernels (``x2v.ops.row_kernels``), run on the CPU by Triton's interpreter, against the
functions they implement (``x2v.ops.norms``, ``x2v.ops.quant_linear``), and built for Hopper without a GPU.

Triton's interpreter converts float32 to bfloat16 by truncation, and to fp8 likewise except that a value rounding
up to a power of two comes out half that (the carry into the exponent is lost), where GPUs round to nearest:
16-/8-bit outputs are held to one step of their type (or that halving), float32 outputs to float32 rounding.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import x2v
from x2v.models import wan_dit
from x2v.ops import fused, norms, quant_linear
from x2v.ops.rope import rope_rotations

rows = pytest.importorskip("x2v.ops.row_kernels")  # needs Triton
assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest.py: the kernels run on the CPU

WIDTH, HEADS, TOKENS = 96, 3, 12  # a width that is not a power of two: the kernels mask their blocks


def within_steps(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, steps: float = 1.0,
                 slack: torch.Tensor | float = 0.0) -> None:
    """Every element of ``got`` within ``steps`` of ``dtype``'s spacing at that value of ``want``'s (or, for fp8,
    the interpreter's half of a power of two), plus ``slack``."""
    got, want = got.float(), want.float()
    finfo = torch.finfo(dtype)

    def close(value: torch.Tensor) -> torch.Tensor:
        spacing = torch.exp2(torch.floor(torch.log2(torch.maximum(value.abs(), want.abs()).clamp_min(finfo.tiny))))
        return (value - want).abs() <= steps * finfo.eps * spacing + finfo.smallest_normal * finfo.eps + slack

    ok = close(got)
    if dtype.itemsize == 1:  # a power of two that came out halved
        ok |= (torch.frexp(got).mantissa.abs() == 0.5) & close(2 * got)
    assert ok.all(), (got - want).abs().max()


def stream(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 residual stream with an offset (LayerNorm's mean matters) and a bf16 branch output."""
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(batch, TOKENS, WIDTH, generator=g) + 1, torch.randn(batch, TOKENS, WIDTH,
                                                                                generator=g).bfloat16()


def modulation(batch: int, per_token: bool, seed: int = 1) -> list[torch.Tensor]:
    """shift, scale, gate as the DiT block slices them from e0 [B, 1 or L, 6, dim] (strided views)."""
    e0 = torch.randn(batch, TOKENS if per_token else 1, 6, WIDTH, generator=torch.Generator().manual_seed(seed))
    return list(e0.unbind(2)[:3])


LAYOUTS = [(1, False), (2, False), (2, True)]  # (batch, per-token modulation): one timestep, two samples, TI2V


@pytest.mark.parametrize("batch, per_token", LAYOUTS)
@pytest.mark.parametrize("out_dtype, quant", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "fp8"),
                                              (torch.bfloat16, "int8"), (torch.float16, "int8")])
def test_layer_norms_equal_their_definitions(batch, per_token, out_dtype, quant):
    x, y = stream(batch)
    shift, scale, gate = modulation(batch, per_token)
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(WIDTH, generator=g), torch.randn(WIDTH, generator=g)
    cases = [("modulated_norm", (x, shift, scale, 1e-6, out_dtype, quant)),
             ("residual_modulated_norm", (x, y, shift, scale, 1e-6, out_dtype, quant)),
             ("gated_residual_layer_norm", (x, y, gate, weight, bias, 1e-6, out_dtype, quant))]
    for name, args in cases:
        got, want = getattr(rows, name)(*args), getattr(norms, name).__wrapped__(*args)
        if name != "modulated_norm":  # (x', norm): the stream is float32 arithmetic, equal to rounding
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
            got, want = got[1], want[1]
        if quant is not None:  # per-row 8-bit values and scales for the next layer, as quantize_activations'
            within_quantization(got, want, rounded_to=out_dtype)
            assert got[0].shape == (batch * TOKENS, WIDTH)
            continue
        assert got.dtype == out_dtype and got.shape == x.shape
        if out_dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            within_steps(got, want, out_dtype)


def within_quantization(got: tuple, want: tuple, rounded_to: torch.dtype | None) -> None:
    """Per-row 8-bit ``(values, scales)`` against the definition's. Rows rounded to 16 bits first (truncated here)
    may have their largest value, hence scale, one step of that type apart, and values one int8 step / two fp8
    steps. The kernels multiply by the scale's reciprocal (within an ulp of dividing): a value within an ulp of a
    rounding boundary may go one step the other way."""
    (values, scale), (want_values, want_scale) = got, want
    assert values.dtype == want_values.dtype and values.shape == want_values.shape
    assert scale.shape == want_scale.shape == (values.shape[0], 1)
    torch.testing.assert_close(scale, want_scale, rtol=torch.finfo(rounded_to).eps if rounded_to else 1e-6, atol=0)
    if values.dtype == torch.int8:  # round to nearest, ties to even, as torch.round
        steps = (values.int() - want_values.int()).abs()
        assert steps.max() <= 1
        assert rounded_to or (steps > 0).float().mean() < 1e-3, "more than values at a rounding boundary moved"
    else:
        within_steps(values, want_values.float(), want_values.dtype, steps=2 if rounded_to else 1)
    assert not torch.isnan(values.float()).any()


@pytest.mark.parametrize("with_rope", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rope_equals_its_definition(with_rope, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, TOKENS, WIDTH, generator=g).to(dtype)
    weight = torch.rand(WIDTH, generator=g) + 0.5
    rope = rope_rotations((1, 3, 4), WIDTH // HEADS, x.device) if with_rope else None
    got = rows.rms_norm_rope(x, weight, 1e-6, HEADS, rope, dtype)
    want = norms.rms_norm_rope.__wrapped__(x, weight, 1e-6, HEADS, rope, dtype)
    assert got.shape == want.shape == (2, TOKENS, HEADS, WIDTH // HEADS) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    elif not with_rope:
        within_steps(got, want, dtype, steps=3)  # rounded twice (normalised values, result), truncated here
    else:  # the rotation mixes each pair: its rounding errors scale with the pair's magnitude
        assert ((got.float() - want.float()).abs() <= rotated_rounding(want) + 1e-6).all()


def rotated_rounding(want: torch.Tensor) -> torch.Tensor:
    """How far RoPE's outputs may move when the normalised values before it are rounded to bf16 (truncated
    here): three bf16 steps of the length of each value's channel pair, which the rotation mixes."""
    pairs = want.float().unflatten(-1, (-1, 2))
    magnitude = pairs.norm(dim=-1, keepdim=True).expand_as(pairs).flatten(-2)
    return 3 * torch.finfo(torch.bfloat16).eps * magnitude


@pytest.mark.parametrize("with_rope", [True, False])
def test_rms_norm_rope_fp8_equals_its_definition_and_its_scale_holds_any_row(with_rope):
    """Q straight to fp8 with a scale known from the gain alone: the kernel and the definition agree (the same
    scale, values within an fp8 step), and even a row with all its energy in the channel of the largest gain,
    the bound's worst case, lands just inside fp8's range, undistorted."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, TOKENS, WIDTH, generator=g).bfloat16()
    x[1, :HEADS] = 0
    weight = torch.rand(WIDTH, generator=g) + 0.5
    top = int(weight.argmax())
    x[1, 0, top] = 7.0  # all of the row's energy where the gain is largest (token 0: RoPE's angles are 0)
    x[1, 1, top ^ 1] = -2.0  # ... or in the other channel of that pair, which RoPE (token 1) rotates into it
    rope = rope_rotations((1, 3, 4), WIDTH // HEADS, x.device) if with_rope else None
    (values, scale), (want_values, want_scale) = (fn(x, weight, 1e-6, HEADS, rope) for fn in (
        rows.rms_norm_rope_fp8, norms.rms_norm_rope_fp8.__wrapped__))
    assert values.dtype == want_values.dtype == torch.float8_e4m3fn
    assert values.shape == (2, TOKENS, HEADS, WIDTH // HEADS)
    assert scale.shape == (1, 1, 1, 1) and scale.item() == want_scale.item()
    within_steps(values, want_values, values.dtype, slack=rotated_rounding(want_values) if with_rope else 0.0)
    exact = norms.rms_norm_rope_float(x, weight, 1e-6, HEADS, rope)
    peak = exact[1, :2].abs().amax(dim=(-1, -2)) / scale.flatten()  # the one-channel rows, in fp8's units
    assert peak[0] > 440 and (peak < 448).all()  # sqrt(width) * max gain: the bound is tight, and holds
    within_steps(want_values.float() * scale, exact, want_values.dtype)  # nothing clipped or flushed
    assert (values[1, 2].float() == 0).all()  # an all-zero row: zeros, not NaN


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("gelu", [False, True])
def test_activation_quantization_equals_its_definition(kind, gelu):
    x = (2 * torch.randn(20, 200, generator=torch.Generator().manual_seed(4))).bfloat16()
    x[3] = 0  # an all-zero row quantizes to zeros with the floor scale, not NaN
    got = rows.quantize_activations(x, kind, gelu)
    within_quantization(got, quant_linear.row_quantized(x, kind, gelu), x.dtype if gelu else None)  # GELU's output
    assert got[0].shape == (20, 200) and (got[0][3].float() == 0).all()


def test_layouts_the_kernels_do_not_take_run_the_definition():
    """The kernels refuse (None) what they do not cover; fused_on_gpu then runs the function itself."""
    x, y = stream(2)
    shift, scale, _ = modulation(2, per_token=True)
    assert rows.modulated_norm(x.transpose(0, 1), shift, scale, 1e-6, torch.bfloat16) is None  # not contiguous
    assert rows.modulated_norm(x.bfloat16(), shift, scale, 1e-6, torch.bfloat16) is None  # the stream is float32
    odd = torch.randn(TOKENS, 2, WIDTH).transpose(0, 1)  # per-token rows that are not sample-major
    assert rows.modulated_norm(x, odd, scale, 1e-6, torch.bfloat16) is None
    assert rows.quantize_activations(torch.zeros(4, rows.MAX_WIDTH + 16), "fp8") is None  # wider than a block


def test_the_dit_runs_through_the_kernels(tmp_path, monkeypatch):
    """Pointed at the CPU, a bf16 DiT forward (one timestep and per-token timesteps) launches each row kernel and
    equals the op-by-op forward up to bf16 rounding; with fp8 layers the activation quantization kernel too, and
    with cudnn_fp8 attention the RMS norm writing Q in fp8."""
    from test_attention_compile import inputs
    from x2v.demo import write_tiny_model

    monkeypatch.setattr(fused, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    # gated_residual has no row kernel (a pointwise add: Inductor's kernel already runs at memory speed): its
    # definition runs here, so neither this test nor its compile state touches the others' (compiled once per process)
    monkeypatch.setattr(wan_dit, "gated_residual", norms.gated_residual.__wrapped__)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__name__) or fn)
    launched = []
    for name in ("modulated_norm", "residual_modulated_norm", "gated_residual_layer_norm", "rms_norm_rope",
                 "rms_norm_rope_fp8", "quantize_activations"):
        real = getattr(rows, name)
        monkeypatch.setattr(rows, name, lambda *a, _name=name, _real=real: launched.append(_name) or _real(*a))
    directory = write_tiny_model(tmp_path / "t2v", "t2v")
    model = x2v.load_dit(directory, dtype=torch.bfloat16)
    x, t, context = inputs(model)
    with torch.no_grad():
        for timestep in (t, t.expand(1, TOKENS)):
            with fused.unfused():
                want = model(x, timestep, context)
            torch.testing.assert_close(model(x, timestep, context), want, rtol=2e-2, atol=2e-2)
    assert set(launched) == {"modulated_norm", "residual_modulated_norm", "gated_residual_layer_norm",
                             "rms_norm_rope"}
    assert not compiled  # every fused function with a row kernel ran it
    model = x2v.load_dit(directory, dit_quantized=True, quant_scheme="fp8-vllm")
    quant_linear.set_quant_mode(model, "w8a8")
    launched.clear()
    with torch.no_grad():
        got = model(x, t, context)
        with fused.unfused():
            want = model(x, t, context)
    assert "quantize_activations" in launched and not compiled
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
    if importlib.util.find_spec("cudnn"):  # with cudnn_fp8 (cuDNN emulated), Q is written in fp8 by its kernel
        from test_cudnn_fp8 import cudnn_fp8, emulate_cudnn

        emulate_cudnn(monkeypatch, [(9, 0)], on_cpu=True)
        monkeypatch.setattr(cudnn_fp8, "quantize", cudnn_fp8.quantize.__wrapped__)  # K, V: as gated_residual above
        model.set_attention("cudnn_fp8")
        launched.clear()
        with torch.no_grad():
            got = model(x, t, context)
        assert launched.count("rms_norm_rope_fp8") == len(model.blocks) and not compiled
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


def test_a_failing_kernel_is_said_once_and_the_compiled_path_takes_over(monkeypatch, caplog):
    monkeypatch.setattr(fused, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    calls = []

    def broken(x):
        calls.append(1)
        raise RuntimeError("does not build for this card")

    def broken_for_this_test(x):  # the function whose row kernel (of the same name) raises
        return x * 2

    monkeypatch.setattr(rows, "broken_for_this_test", broken, raising=False)
    double = fused.fused_on_gpu(broken_for_this_test, row_kernel=True)
    with caplog.at_level(logging.WARNING):
        results = [double(torch.ones(4)) for _ in range(3)]
    assert all(torch.equal(r, torch.full((4,), 2.0)) for r in results)
    assert len(calls) == 1 and sum("Triton kernel failed" in r.getMessage() for r in caplog.records) == 1

    def skipped_for_this_test(x):
        return x + 1

    with fused.compiled_only():  # and the benchmarks' switch skips a kernel altogether
        monkeypatch.setattr(rows, "skipped_for_this_test", lambda x: pytest.fail("kernel ran"), raising=False)
        assert torch.equal(fused.fused_on_gpu(skipped_for_this_test, row_kernel=True)(torch.ones(4)),
                           torch.full((4,), 2.0))


def test_row_kernels_build_for_hopper_vectorized_without_spills(tmp_path):
    """The real compile for sm_90 at Wan's widths (no GPU needed: Triton's wheel carries ptxas): no spilled
    registers, and every global load and store of the rows 128 bits wide (the per-row scale aside)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no CUDA compiler")
    report = tmp_path / "build.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[1] / "benchmarks" / "triton_build.py"
    subprocess.run([sys.executable, script, "--kernels", "rows", "--json", report], env=env, check=True,
                   capture_output=True)
    builds = json.loads(report.read_text())
    assert len(builds) >= 7
    for build in builds:
        assert build["spill_bytes"] == 0, build
        assert build["loads"] == [["v4", "32"]], build
        # the quantizations' row scales, the fp8 RMS norm's one scale
        constants = build["constants"]
        scalar_stores = int(build["kernel"] == "_quantize_kernel" or any(constants.get(c) for c in ("FP8_SCALED",
                                                                                                     "QUANT")))
        assert ["v4", "32"] in build["stores"] and len(build["stores"]) == 1 + scalar_stores, build
