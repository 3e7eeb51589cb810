"""Attention types by LightX2V's keys, and ``use_compile`` (compiled blocks, no recompile on a LoRA strength)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

import x2v
from test_lora import BASES, random_pairs, write_pairs
from x2v.demo import write_tiny_model
from x2v.loading.lora import attach_loras, set_lora_strength
from x2v.ops import attention as attn
from x2v.pipelines.wan import Pipeline, compile_blocks


@pytest.fixture(autouse=True)
def fresh_kernels():
    attn.kernel.cache_clear()  # each test sees its own installed packages and notices
    yield
    attn.kernel.cache_clear()


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "t2v", "t2v")


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return (torch.randn(1, cfg.in_dim, 2, 4, 6, generator=g), torch.tensor([650.0]),
            torch.randn(1, 7, cfg.text_dim, generator=g))


def test_unknown_attention_type_is_refused(t2v):
    model = x2v.load_dit(t2v, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown attention type 'flash3'.*torch_sdpa, flash_attn2, flash_attn3"):
        model.set_attention("flash3")


@pytest.mark.parametrize("name, notice", [("flash_attn3", "needs FlashAttention 3"),
                                          ("sage_attn2", "own 8-bit attention types sage_triton / cudnn_fp8"),
                                          ("cudnn_fp8", "needs nvidia-cudnn-frontend"),
                                          ("radial_attn", "not implemented in x2v")])
def test_unavailable_types_fall_back_to_sdpa_with_a_notice(t2v, caplog, monkeypatch, name, notice):
    for package in ("flash_attn_interface", "sageattention", "cudnn"):
        monkeypatch.setitem(sys.modules, package, None)  # not installed, even where it is
    monkeypatch.delitem(sys.modules, "x2v.ops.cudnn_fp8", raising=False)
    model = x2v.load_dit(t2v, dtype=torch.float32)
    x, t, context = inputs(model)
    with torch.no_grad():
        want = model(x, t, context)
        with caplog.at_level(logging.WARNING):
            model.set_attention(name, name, name)
        assert model.blocks[0].self_attn.backend == name and model.blocks[1].cross_attn.backend == name
        assert torch.equal(model(x, t, context), want)
    assert sum(notice in r.getMessage() for r in caplog.records) == 1  # said once, not per layer or call


def test_installed_kernel_is_called_with_the_layout_it_takes(monkeypatch):
    """A package found by name is called with [B, L, heads, d] (CUDA half-precision inputs only)."""
    calls = []

    def fake_flash(q, k, v):
        calls.append(q.shape)
        return attn.sdpa(q, k, v)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash))
    q = torch.randn(1, 5, 2, 8, dtype=torch.bfloat16)
    assert attn.kernel("flash_attn2").func is fake_flash
    assert torch.equal(attn.attention(q, q, q, "flash_attn2"), attn.sdpa(q, q, q))
    assert calls == []  # CPU tensors: the CUDA kernel is not called
    if torch.cuda.is_available():
        attn.attention(q.cuda(), q.cuda(), q.cuda(), "flash_attn2")
        assert calls == [(1, 5, 2, 8)]


def test_pipeline_reads_the_attention_keys(t2v):
    pipe = Pipeline.from_pretrained(t2v, device="cpu", self_attn_1_type="sage_attn2", cross_attn_1_type="torch_sdpa",
                                    target_height=32, target_width=32, target_video_length=5, infer_steps=1)
    dit = next(iter(pipe.dits.values()))
    assert (dit.blocks[0].self_attn.backend, dit.blocks[0].cross_attn.backend) == ("sage_attn2", "torch_sdpa")


def test_compiled_blocks_match_and_a_lora_strength_change_does_not_recompile(t2v, tmp_path):
    """The LoRA touches block 0 only: blocks with and without a branch must not share a compiled graph."""
    import torch._dynamo

    eager = x2v.load_dit(t2v, dtype=torch.float32)
    model = x2v.load_dit(t2v, dtype=torch.float32)
    path = write_pairs(tmp_path / "l.safetensors", random_pairs(model, bases=BASES[:1]),
                       lambda b: f"diffusion_model.{b}", ".lora_up.weight", ".lora_down.weight")
    for m in (eager, model):
        attach_loras(m, [{"path": path, "strength": 0.5}])
    compile_blocks(model, "cpu")
    x, t, context = inputs(model)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context), eager(x, t, context), rtol=1e-4, atol=1e-5)
        for m in (eager, model):
            set_lora_strength(m, path, 1.5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            changed = model(x, t, context)
        torch.testing.assert_close(changed, eager(x, t, context), rtol=1e-4, atol=1e-5)


def test_compiled_quantized_blocks_trace_without_graph_breaks(t2v):
    """compile_blocks settles each 8-bit layer's path first: the compiled block is one graph (no kernel probes or
    notices inside), and computes what the eager block computes."""
    import torch._dynamo

    from x2v.ops.rope import rope_rotations

    model = x2v.load_dit(t2v, dit_quantized=True, quant_scheme="int8-vllm")
    eager = x2v.load_dit(t2v, dit_quantized=True, quant_scheme="int8-vllm")
    compile_blocks(model, "cpu")
    assert {m.mode for m in model.modules() if hasattr(m, "mode")} == {"weight-only"}  # CPU: no 8-bit kernel
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x, e0 = torch.randn(1, 48, cfg.dim, generator=g), torch.randn(1, 1, 6, cfg.dim, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.dim, generator=g).bfloat16()
    rope = rope_rotations((2, 4, 6), cfg.head_dim, x.device)
    with torch.no_grad():
        explained = torch._dynamo.explain(model.blocks[0].forward)(x, e0, text, None, rope)
        assert explained.graph_break_count == 0
        torch.testing.assert_close(model.blocks[0](x, e0, text, None, rope),
                                   eager.blocks[0](x, e0, text, None, rope), rtol=2e-2, atol=2e-2)


def test_fused_norms_compile_to_the_eager_results(t2v, monkeypatch, caplog):
    """On GPUs the block's norms (with modulation, RoPE, the residual add before and the cast to the linear
    layers' dtype after) run compiled, one kernel each. The same wrapper is pointed at the CPU here (C++ instead of Triton): a bf16 DiT forward,
    one timestep and per-token timesteps (Wan2.2 TI2V), equals the op-by-op forward up to bf16 rounding."""
    from x2v.ops import fused

    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__name__) or real_compile(fn, **kw))
    monkeypatch.setattr(fused, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    model = x2v.load_dit(t2v, dtype=torch.bfloat16)
    x, t, context = inputs(model)
    for timestep in (t, t.expand(1, 12)):  # 12 tokens: 2 x 2 x 3 patches
        with torch.no_grad():
            with fused.compiled_only():  # the hand-written kernels have their own tests (test_row_kernels.py)
                got = model(x, timestep, context)
            with fused.unfused():
                want = model(x, timestep, context)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert set(compiled) == {"modulated_norm", "rms_norm_rope", "gated_residual_layer_norm",
                             "residual_modulated_norm", "gated_residual"}  # (and linear_gelu's fused matmul)
    assert not [r for r in caplog.records if "runs unfused" in r.message]  # the compiled path ran


def test_a_failed_compile_falls_back_to_eager_once(monkeypatch, caplog):
    from x2v.ops import fused

    def refuse(fn, **kw):
        raise RuntimeError("no working Triton here")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(fused, "FUSED_DEVICES", ("cpu",))
    double = fused.fused_on_gpu(lambda x: x * 2)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(double(torch.ones(4)), torch.full((4,), 2.0))
        monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
        assert torch.equal(double(torch.ones(4)), torch.full((4,), 2.0))
        assert torch.equal(double(torch.ones(4)), torch.full((4,), 2.0))
    assert len([r for r in caplog.records if "runs unfused" in r.message]) == 1


def test_linear_gelu_takes_the_fused_matmul_only_for_plain_half_precision_linears(monkeypatch):
    """On GPUs a plain bf16 / fp16 Linear + GELU is one cuBLAS call (bias and tanh-GELU in its epilogue); pointed at
    the CPU here, where torch's op applies exact GELU instead (equal within bf16 rounding). Layers that must run
    as modules (float32, hooks such as offload's, LoRA branches, 8-bit layers) and ``unfused()`` take the module
    path, which is Linear then tanh-GELU exactly."""
    from torch import nn

    from x2v.ops import fused

    calls = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(fused, "FUSED_DEVICES", ("cpu",))
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 96)
    x = torch.randn(2, 5, 64, generator=g)
    want = torch.nn.functional.gelu(layer(x), approximate="tanh")
    assert torch.equal(fused.linear_gelu(layer, x), want) and not calls  # float32: the modules
    layer.bfloat16()
    got = fused.linear_gelu(layer, x.bfloat16())
    assert calls and got.shape == (2, 5, 96) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    calls.clear()
    with fused.unfused():
        fused.linear_gelu(layer, x.bfloat16())
    handle = layer.register_forward_pre_hook(lambda module, args: None)
    fused.linear_gelu(layer, x.bfloat16())
    handle.remove()
    assert not calls


def test_fused_feed_forward_keeps_dynamic_lora_branches(t2v, tmp_path, monkeypatch):
    """A dynamic LoRA branch is a forward hook on the layer: the fused matmul must not skip it."""
    from x2v.ops import fused

    monkeypatch.setattr(fused, "FUSED_DEVICES", ("cpu",))
    model = x2v.load_dit(t2v, dtype=torch.bfloat16)
    x, t, context = inputs(model)
    with torch.no_grad():
        without = model(x, t, context)
        path = write_pairs(tmp_path / "ffn.safetensors", random_pairs(model, bases=("blocks.0.ffn.0",)),
                           lambda b: f"diffusion_model.{b}", ".lora_up.weight", ".lora_down.weight")
        attach_loras(model, [{"path": path, "strength": 1.0}])
        got = model(x, t, context)
        with fused.unfused():
            want = model(x, t, context)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert (got - without).abs().max() > 10 * (got - want).abs().max()  # the branch took effect


def test_rope_is_the_complex_rotation_of_channel_pairs():
    """apply_rope's real arithmetic is the official complex multiply by e^{i*angle} (angles in float64)."""
    from x2v.ops.rope import _rope_angles, apply_rope, rope_rotations

    grid, d = (2, 3, 4), 24
    x = torch.randn(1, 24, 2, d, generator=torch.Generator().manual_seed(6))
    angles = _rope_angles(grid, d, 10000.0)
    want = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
                              * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)
    torch.testing.assert_close(apply_rope(x, rope_rotations(grid, d, x.device)), want.float(), rtol=1e-5, atol=1e-5)
