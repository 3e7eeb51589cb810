"""Quantized execution: per-channel quantization, QuantLinear's two paths, quantize-at-load, quantized umT5/CLIP.

References are computed independently in the tests (plain float math on the same tensors); bounds are measured
values with margin, stated beside each.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ckpt_utils import write_pth
from test_clip import hf_model, image, official_dir  # noqa: F401  (module fixtures)
from test_dit import RELEASES, VARIANTS, diffusers_dit, make_inputs, official_state_dict, write_official_dir
from test_quant_loading import FORMATS, converter_quantizes, quantize, relative_l2, write_format
from test_t5 import TINY_CONFIGS, padded_batch, tiny_hf_encoder
from test_t5 import official_state_dict as t5_state_dict

from x2v.formats.quant import FLOAT, quantized_in_releases
from x2v.loading.components import CLIP_FILE as OFFICIAL_FILE
from x2v.loading.components import COMPONENTS
from x2v.loading.dit import load_dit
from x2v.loading.inspect import memory_at
from x2v.loading.load import load_image_encoder, load_text_encoder
from x2v.loading.quantized import quantized_linears
from x2v.loading.resolve import resolve_component
from x2v.pipelines.settings import resolve_settings
from x2v.loading.weights import build_on_meta
from x2v.models.wan_dit import FP32_PARAMS, WanDiT
from x2v.ops.quant_linear import QuantLinear, replace_linears, set_quant_mode
from x2v.ops.quant_math import QUANT_DTYPES, dequantize_weight, quantize_weight

OFFICIAL_T5_NAME = COMPONENTS["t5"].official_files[0]

KINDS = ("int8", "fp8")
MODES = ("weight-only", "w8a8")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LINEAR_BOUND = {"int8": 1e-2, "fp8": 3e-2}  # the bounds; measured 7e-3 / 2.6e-2 (activation rounding)


def quantized_layer(weight, bias, kind, compute_dtype, device="cpu") -> QuantLinear:
    layer = QuantLinear(weight.shape[1], weight.shape[0], bias is not None, kind, compute_dtype)
    q, scale = quantize_weight(weight, kind)
    state = {"weight": q, "weight_scale": scale} | ({"bias": bias.to(compute_dtype)} if bias is not None else {})
    layer.load_state_dict(state, assign=True)
    return layer.to(device)


# --- quantization -----------------------------------------------------------------------------------------------

def fp8_half_step(values: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at each value: 2^(e-4) for normal numbers (exponent e), 2^-10 below 2^-6."""
    exponent = torch.floor(torch.log2(values.abs().clamp(min=2.0 ** -6)))
    return 2.0 ** (exponent - 4)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact_to_the_scale(kind):
    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 48)[:, None]
    weight[5] = 0  # an all-zero row gets the 1e-5 floor, not a division by zero
    q, scale = quantize_weight(weight, kind)
    qmax = 127 if kind == "int8" else 448
    assert q.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn)
    assert scale.dtype == torch.float32 and scale.shape == (48, 1)
    amax = weight.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(scale, amax.clamp(min=1e-5) / qmax, rtol=0, atol=0)
    values = weight / scale  # on the quantization grid's scale
    error = (q.float() - values).abs()
    half_step = 0.5 if kind == "int8" else fp8_half_step(values)
    assert (error <= half_step + 1e-6).all()
    assert q.float().abs().amax(dim=1)[amax[:, 0] > 0].eq(qmax).all()  # each row's largest value hits the range end
    back = dequantize_weight(q, scale, torch.float32)
    assert torch.equal(back, q.float() * scale)
    assert torch.equal(quantize_weight(back, kind)[0], q)  # re-quantizing the dequantized weight gives the same q


@pytest.mark.parametrize("kind", KINDS)
def test_stochastic_rounding_is_unbiased_and_stays_on_neighbours(kind):
    """A change far below one quantization step survives on average (what merging a LoRA into 8-bit needs)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 64, generator=g)
    base[:, 0] = 4.0  # pin each row's scale so every draw quantizes on the same grid
    nudged = base + 1e-3
    nearest, scale = quantize_weight(nudged, kind)
    draws = torch.stack([dequantize_weight(*quantize_weight(nudged, kind, generator=g), torch.float32)
                         for _ in range(400)])
    plain_bias = (dequantize_weight(nearest, scale, torch.float32) - nudged).mean().abs()
    stochastic_bias = (draws.mean(0) - nudged).mean().abs()
    assert stochastic_bias < plain_bias / 4
    # every draw is one of the two grid neighbours of the value
    values = nudged / scale
    spacing = 1.0 if kind == "int8" else 2 * fp8_half_step(values)
    assert ((draws / scale - values).abs() <= spacing + 1e-5).all()


# --- QuantLinear ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_linear_matches_the_float_layer(kind, mode, device):
    """Against F.linear with the same (dequantized) weights: the only extra error is activation rounding."""
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(96, 128, generator=g), torch.randn(96, generator=g)
    layer = quantized_layer(weight, bias, kind, torch.float32, device)
    layer.mode = mode
    for rows in (3, 40):  # few rows: the int8 kernel needs padding to more than 16
        x = torch.randn(2, rows, 128, generator=g).to(device)
        reference = F.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
        out = layer(x)
        assert out.shape == (2, rows, 96) and out.dtype == torch.float32
        assert relative_l2(out, reference) <= (LINEAR_BOUND[kind] if mode == "w8a8" else 1e-6)


@pytest.mark.parametrize("bias_in_epilogue", (True, False))
@pytest.mark.parametrize("kind", KINDS)
def test_8bit_matmul_bias_in_the_epilogue_or_after(kind, bias_in_epilogue, monkeypatch):
    """The bias goes into the 8-bit matmul's epilogue where the kernel takes one (fp8: probed per device; int8:
    the compiled scaling), else it is added after: the same values up to the output's rounding."""
    from x2v.ops import quant_linear

    assert quant_linear.scaled_mm_takes_bias(torch.device("cpu"))  # the probe itself (CPU kernels take a bias)
    monkeypatch.setitem(quant_linear.SCALED_MM_ADDS_BIAS, "cpu", bias_in_epilogue)
    g = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    with_bias = quantized_layer(weight, bias, kind, torch.bfloat16)
    without = quantized_layer(weight, None, kind, torch.bfloat16)
    for layer in (with_bias, without):
        layer.mode = "w8a8"
    x = torch.randn(40, 64, generator=g)
    torch.testing.assert_close(with_bias(x).float(), without(x).float() + with_bias.bias.float(),
                               rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("batch", [1, 2])
def test_fp8_input_with_an_offset_per_sample(batch):
    """An fp8 activation with one scale and a per-sample offset (cudnn_fp8's output, V's mean aside) through an fp8
    layer: the offset's projection joins the bias (in the matmul for one sample, added after for two); equal to
    the layer on the dequantized input within fp8 rounding."""
    from x2v.ops.quant_linear import fp8_input

    g = torch.Generator().manual_seed(4)
    layer = quantized_layer(torch.randn(48, 64, generator=g) / 8, torch.randn(48, generator=g), "fp8", torch.bfloat16)
    layer.mode = "w8a8"
    values = (torch.randn(batch, 24, 64, generator=g) * 100).to(QUANT_DTYPES["fp8"])
    scale, offset = torch.tensor(0.01).reshape(1, 1, 1, 1), 3 * torch.randn(batch, 1, 64, generator=g)
    got = layer.run_quantized(fp8_input(values, scale), offset)
    want = F.linear((values.float() * scale.flatten() + offset).bfloat16(), layer.dequantized_weight(), layer.bias)
    assert got.shape == want.shape == (batch, 24, 48) and got.dtype == torch.bfloat16
    assert relative_l2(got, want) < 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_linear_bf16_compute_and_odd_shapes(kind):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(20, 36, generator=g)  # not multiples of 8: the 8-bit kernels cannot take them
    layer = quantized_layer(weight, None, kind, torch.bfloat16)
    layer.mode = "w8a8"
    x = torch.randn(5, 36, generator=g)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    reference = F.linear(x.bfloat16(), layer.dequantized_weight())
    assert torch.equal(out, reference)  # fell back to the weight-only computation


# --- whole DiT --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    overrides, model_type, x_ch, y_ch, clip_tokens = VARIANTS["i2v"]
    sd = official_state_dict(diffusers_dit(overrides))
    directory = write_official_dir(tmp_path_factory.mktemp("float"), sd, model_type)
    bf16 = load_dit(directory, dtype=torch.bfloat16)
    inputs = make_inputs(x_ch, y_ch, clip_tokens)
    return sd, directory, bf16, inputs


def forward(model, inputs):
    x, y, context, clip, t = inputs
    with torch.no_grad():
        return model(x, t, context, clip_fea=clip, y=y)


# Relative L2 against the bf16 model, measured on this tiny i2v model, weight-only / 8-bit activations:
# int8 5.7e-3 / 7.1e-3, fp8 1.9e-2 / 2.6e-2. Bounds about 1.6x.
DIT_BOUND = {"int8": 1.2e-2, "fp8": 4e-2}


@pytest.mark.parametrize("fmt", ["lightx2v-int8", "lightx2v-fp8"])
@pytest.mark.parametrize("mode", MODES)
def test_quantized_file_stays_near_the_bf16_forward(tmp_path, tiny_i2v, fmt, mode):
    sd, _, bf16, inputs = tiny_i2v
    tensors, _ = write_format(sd, fmt)
    model = load_dit(write_official_dir(tmp_path, tensors, "i2v"))  # quantized file: bf16 compute by default
    set_quant_mode(model, mode)
    assert relative_l2(forward(model, inputs), forward(bf16, inputs)) <= DIT_BOUND[FORMATS[fmt][0]]


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_at_load_equals_the_release_recipe(tiny_i2v, kind):
    """dit_quantized + a scheme on a float file: the release layers only, the same bytes the converter writes."""
    sd, directory, bf16, inputs = tiny_i2v
    model = load_dit(directory, dit_quantized=True, quant_scheme=f"{kind}-vllm")
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {k.removesuffix(".weight") for k, v in sd.items() if converter_quantizes(k, v)}
    assert model.blocks[0].self_attn.q.compute_dtype == torch.bfloat16
    assert model.head.head.weight.dtype == torch.float32 and model.text_embedding[0].weight.dtype == torch.bfloat16
    for name in quantized:
        q, scale = quantize_weight(sd[f"{name}.weight"], kind)
        layer = model.get_submodule(name)
        assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale), name
    assert relative_l2(forward(model, inputs), forward(bf16, inputs)) <= DIT_BOUND[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_shared_activation_quantization_changes_no_number(tiny_i2v, kind, monkeypatch):
    """With 8-bit kernels, each of the block's three norms quantizes its output in its own pass for the 8-bit
    layers after it (q, k and v share that one copy; the cross-attention's q; the feed-forward's first layer), and
    the feed-forward's GELU goes into the second layer's input quantization: bit for bit what each layer on its
    own computes (``unfused()``)."""
    from x2v.ops import norms, quant_linear
    from x2v.ops.fused import unfused

    _, directory, _, inputs = tiny_i2v
    model = load_dit(directory, dit_quantized=True, quant_scheme=f"{kind}-vllm")
    set_quant_mode(model, "w8a8")
    calls = []  # (where, gelu) of every per-row quantization
    for module, where in ((quant_linear, "layer"), (norms, "norm")):
        real = module.row_quantized
        monkeypatch.setattr(module, "row_quantized",
                            lambda x, k, gelu=False, _real=real, _where=where: calls.append((_where, gelu))
                            or _real(x, k, gelu))
    got = forward(model, inputs)
    shared_calls, calls[:] = list(calls), []
    with unfused():
        want = forward(model, inputs)
    assert torch.equal(got, want)
    blocks = len(model.blocks)
    # Per block and forward: q/k/v once instead of three times, fc2 with the GELU instead of after it.
    assert len(calls) - len(shared_calls) == 2 * blocks
    assert shared_calls.count(("layer", True)) == blocks and ("layer", True) not in calls
    assert shared_calls.count(("norm", False)) == 3 * blocks and ("norm", False) not in calls


@pytest.mark.parametrize("release", ["Wan2.1-T2V-14B", "Wan2.2-I2V-A14B"])
def test_resident_memory_of_a_quantized_14b_dit(release):
    """Counted on the meta model as load_dit builds it: 8-bit linears, bf16 compute, float32 where official.
    (14.91 GB; Wan2.1 I2V/FLF2V-14B, 16.4B parameters with the image branch: 17.03 GB.)"""
    config = RELEASES[release][0]
    model = build_on_meta(lambda: WanDiT(config))
    layers, kind = quantized_linears(model, model.state_dict(), FLOAT, "fp8", "dit", FP32_PARAMS)
    replace_linears(model, layers, kind, torch.bfloat16)
    resident = memory_at(model, torch.bfloat16, FP32_PARAMS)
    assert resident <= 16e9, f"{resident / 1e9:.2f} GB"
    assert all(quantized_in_releases(f"{layer}.weight") for layer in layers)


# --- umT5 and CLIP ----------------------------------------------------------------------------------------------

def quantize_release_layers(tensors, component, kind):
    """LightX2V's recipe for quantized T5/CLIP files (``quantize`` of test_quant_loading): per channel, release
    layers only."""
    out = {}
    for key, tensor in tensors.items():
        if quantized_in_releases(key, component):
            out[key], out[key.replace(".weight", ".weight_scale")] = quantize(tensor, kind, per_channel=True)
        else:
            out[key] = tensor
    return out


# Relative L2 of the encoder output against the float file, 8-bit matmuls, measured: umT5 (bf16) int8 1.5e-2,
# fp8 6.3e-2, ComfyUI per-tensor fp8 (fp32) 4.8e-2; CLIP (fp32) int8 1.3e-2, fp8 4.0e-2. Bounds about 1.6x.
ENCODER_BOUND = {"int8": 2.5e-2, "fp8": 0.1}


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_t5_file(tmp_path, kind):
    config = TINY_CONFIGS[0]
    tensors = t5_state_dict(tiny_hf_encoder(**config))
    directory = tmp_path / "model"
    write_pth(directory / OFFICIAL_T5_NAME, {k: v.bfloat16() for k, v in tensors.items()})
    write_pth(directory / OFFICIAL_T5_NAME.replace("bf16", kind), quantize_release_layers(tensors, "t5", kind))
    settings = resolve_settings(config_json={"t5_quantized": True, "t5_quant_scheme": f"{kind}-vllm"})
    found = resolve_component("t5", directory, settings.sources).path
    assert found.name == f"models_t5_umt5-xxl-enc-{kind}.pth"
    model = load_text_encoder(found, dtype=torch.bfloat16, quantized=True, quant_scheme=f"{kind}-sgl")
    assert isinstance(model.blocks[0].ffn.gate[0], QuantLinear) and isinstance(model.blocks[1].attn.o, QuantLinear)
    assert model.token_embedding.weight.dtype == torch.bfloat16
    ids, mask = padded_batch(config["vocab_size"])
    set_quant_mode(model, "w8a8")
    with torch.no_grad():
        got = model(ids, mask)
        want = load_text_encoder(directory, dtype=torch.bfloat16)(ids, mask)
        at_load = load_text_encoder(directory, dtype=torch.bfloat16, quantized=True, quant_scheme=f"{kind}-vllm")
        set_quant_mode(at_load, "w8a8")
        assert torch.equal(at_load(ids, mask), got)  # quantizing at load = LightX2V's file (same recipe)
    assert relative_l2(got.float(), want.float()) <= ENCODER_BOUND[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_schemes_take_the_bare_kind(tmp_path, kind):
    """LightX2V's t5_quant_scheme list has plain "int8" / "fp8"; dit_quant_scheme does not (refused there)."""
    from x2v.errors import CheckpointError
    from x2v.formats.quant import FLOAT, check_scheme

    tensors = t5_state_dict(tiny_hf_encoder(**TINY_CONFIGS[0]))
    write_pth(tmp_path / OFFICIAL_T5_NAME, tensors)
    write_pth(tmp_path / OFFICIAL_T5_NAME.replace("bf16", kind), quantize_release_layers(tensors, "t5", kind))
    settings = resolve_settings(config_json={"t5_quantized": True, "t5_quant_scheme": kind})
    found = resolve_component("t5", tmp_path, settings.sources).path
    assert found.name == f"models_t5_umt5-xxl-enc-{kind}.pth"
    model = load_text_encoder(found, quantized=True, quant_scheme=kind)
    assert isinstance(model.blocks[0].attn.q, QuantLinear) and model.blocks[0].attn.q.kind == kind
    with pytest.raises(CheckpointError, match=f"unknown dit_quant_scheme '{kind}'"):
        check_scheme(FLOAT, kind, True, "f")


def test_comfy_scaled_fp8_umt5_with_hf_names(tmp_path):
    from safetensors.torch import save_file

    from x2v.formats.t5_keys import official_to_hf
    config = TINY_CONFIGS[1]
    tensors = t5_state_dict(tiny_hf_encoder(**config))
    official = quantize_release_layers(tensors, "t5", "fp8")
    hf = {}
    for key, tensor in official.items():
        if key.endswith(".weight_scale"):  # ComfyUI: one 0-dim scale per tensor, spelled scale_weight
            weight = tensors[key.replace("_scale", "")]
            scale = weight.abs().max() / 448
            hf_key = official_to_hf({key.replace("_scale", ""): weight}).popitem()[0]
            hf[hf_key] = (weight / scale).to(torch.float8_e4m3fn)
            hf[hf_key.replace(".weight", ".scale_weight")] = scale
        elif not key.endswith(".weight") or key.replace(".weight", ".weight_scale") not in official:
            hf.update(official_to_hf({key: tensor}))
    hf["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(hf, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    model = load_text_encoder(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", dtype=torch.float32)
    layer = model.blocks[0].attn.q
    assert isinstance(layer, QuantLinear) and layer.weight_scale.shape == (layer.out_features, 1)
    ids, mask = padded_batch(config["vocab_size"])
    with torch.no_grad():
        want = load_text_encoder(write_pth(tmp_path / "float.pth", tensors))(ids, mask)
        assert relative_l2(model(ids, mask), want) <= ENCODER_BOUND["fp8"]


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_clip_file(tmp_path, official_dir, image, kind):  # noqa: F811
    from x2v.formats.readers import read_checkpoint
    tensors = dict(read_checkpoint(official_dir / OFFICIAL_FILE))
    quantized_name = OFFICIAL_FILE.replace(".pth", f"-{kind}.pth")
    write_pth(tmp_path / quantized_name, quantize_release_layers(tensors, "clip", kind))
    settings = resolve_settings(config_json={"clip_quantized": True, "clip_quant_scheme": f"{kind}-q8f"})
    assert resolve_component("clip", tmp_path, settings.sources).path == tmp_path / quantized_name
    model = load_image_encoder(tmp_path, quantized=True, quant_scheme=f"{kind}-q8f")
    assert isinstance(model.transformer[0].attn.to_qkv, QuantLinear)
    assert isinstance(model.transformer[1].mlp[2], QuantLinear)
    set_quant_mode(model, "w8a8")
    with torch.no_grad():
        want = load_image_encoder(official_dir)(image)
        assert relative_l2(model(image), want) <= ENCODER_BOUND[kind]


def test_gpu_fusion_compiles_to_the_same_results():
    """On GPUs the activation quantization and the int8 epilogue run through torch.compile; compiled here on CPU
    (same graphs, C++ instead of Triton), they must give the eager results bit for bit."""
    from x2v.ops.fused import COMPILE_OPTIONS
    from x2v.ops.quant_linear import quantize_activations, scale_int8_product

    g = torch.Generator().manual_seed(3)
    quantize = torch.compile(quantize_activations.__wrapped__, dynamic=False, options=COMPILE_OPTIONS)
    epilogue = torch.compile(scale_int8_product.__wrapped__, dynamic=False, options=COMPILE_OPTIONS)
    for rows in (37, 64):
        x = torch.randn(rows, 48, generator=g).bfloat16()
        for kind in KINDS:
            for got, want in zip(quantize(x, kind), quantize_activations(x, kind)):
                assert torch.equal(got.float(), want.float())
        acc = torch.randint(-2**20, 2**20, (rows, 24), dtype=torch.int32, generator=g)
        x_scale, w_scale = torch.rand(rows, 1, generator=g), torch.rand(24, 1, generator=g)
        for bias in (None, torch.randn(24, generator=g).bfloat16()):
            assert torch.equal(epilogue(acc, x_scale, w_scale, bias, torch.bfloat16),
                               scale_int8_product(acc, x_scale, w_scale, bias, torch.bfloat16))


def test_pipeline_with_quantized_dit_and_text_encoder(tmp_path):
    """LightX2V's keys on a float model directory: DiT and umT5 quantized at load, video close to the float one."""
    from x2v.demo import write_tiny_model
    from x2v.pipelines.wan import Pipeline

    model_dir = write_tiny_model(tmp_path / "i2v", "i2v")
    small = dict(target_height=64, target_width=64, target_video_length=5, infer_steps=2)
    picture = torch.linspace(-1, 1, 3 * 48 * 80).reshape(3, 48, 80)
    float_video = Pipeline.from_pretrained(model_dir, device="cpu", **small).generate(
        "a cat", image=picture, seed=1, progress=False).frames
    pipe = Pipeline.from_pretrained(model_dir, device="cpu", dit_quantized=True, dit_quant_scheme="fp8-vllm",
                                    t5_quantized=True, t5_quant_scheme="int8-vllm", clip_quantized=True,
                                    clip_quant_scheme="int8-vllm", **small)
    dit = next(iter(pipe.dits.values()))
    assert isinstance(dit.blocks[0].ffn[0], QuantLinear) and dit.blocks[0].ffn[0].kind == "fp8"
    assert isinstance(pipe.text_encoder.blocks[0].attn.q, QuantLinear)
    assert isinstance(pipe.clip.transformer[0].mlp[0], QuantLinear)
    video = pipe.generate("a cat", image=picture, seed=1, progress=False).frames
    difference = abs(video.astype(float) - float_video.astype(float)).mean()
    assert 0 < difference < 3  # mean uint8 levels, measured 0.29


def test_inspect_reports_quantized_encoders_and_memory(tmp_path):
    from x2v.demo import write_tiny_model
    from x2v.formats.readers import read_checkpoint
    from x2v.loading.inspect import inspect_model

    model_dir = write_tiny_model(tmp_path / "i2v", "i2v")
    t5 = dict(read_checkpoint(model_dir / OFFICIAL_T5_NAME))
    write_pth(model_dir / "models_t5_umt5-xxl-enc-fp8.pth", quantize_release_layers(t5, "t5", "fp8"))
    plain = {r.name: r for r in inspect_model(model_dir, dtype=torch.bfloat16)}
    settings = resolve_settings(config_json={"t5_quantized": True, "t5_quant_scheme": "fp8-vllm",
                                             "dit_quantized": True, "dit_quant_scheme": "int8-vllm"})
    reports = {r.name: r for r in inspect_model(model_dir, settings.sources, torch.bfloat16)}
    assert not any(r.problems for r in reports.values())
    assert reports["t5"].found.path.name == "models_t5_umt5-xxl-enc-fp8.pth"
    assert reports["t5"].facts["quantization"].startswith("lightx2v-fp8")
    assert reports["dit"].facts["quantization"] == "none; quantized to int8 at load (dit_quant_scheme)"
    for name in ("dit", "t5"):
        assert reports[name].facts["memory_bfloat16"] < 0.75 * plain[name].facts["memory_bfloat16"]


def test_fp8_e5m2_weights_are_dequantized(tmp_path, tiny_i2v):
    """e5m2 (rare) has no 8-bit kernel here: its layers load as float layers with the scales applied."""
    from safetensors.torch import save_file

    sd, _, bf16, inputs = tiny_i2v
    tensors = dict(sd)
    key = "blocks.0.ffn.0.weight"
    scale = sd[key].abs().max() / 57344
    tensors[key] = (sd[key] / scale).to(torch.float8_e5m2)
    tensors[key.replace("weight", "scale_weight")] = scale
    save_file(tensors, str(tmp_path / "e5m2.safetensors"))
    model = load_dit(tmp_path / "e5m2.safetensors", dtype=torch.float32)
    layer = model.blocks[0].ffn[0]
    assert type(layer) is torch.nn.Linear
    assert torch.equal(layer.weight, tensors[key].float() * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_goes_in_before_quantizing_at_load_as_in_convert(tmp_path, tiny_i2v, kind):
    """A float file quantized at load with a LoRA: the LoRA is added to the float weight, then it is quantized
    (fp8: stochastic rounding seeded by the tensor's name) — the same 8-bit values `x2v convert` writes."""
    import zlib

    from safetensors.torch import save_file

    from x2v.convert import convert
    from x2v.convert.options import LoraSpec

    sd, directory, _, _ = tiny_i2v
    key = "blocks.1.ffn.0.weight"
    g = torch.Generator().manual_seed(7)
    out_features, in_features = sd[key].shape
    up, down = 0.05 * torch.randn(out_features, 4, generator=g), 0.05 * torch.randn(4, in_features, generator=g)
    head_diff = 0.01 * torch.randn(sd["head.head.weight"].shape, generator=g)
    lora_file = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.1.ffn.0.lora_up.weight": up,
               "diffusion_model.blocks.1.ffn.0.lora_down.weight": down,
               "diffusion_model.head.head.diff": head_diff}, str(lora_file))
    model = load_dit(directory, dit_quantized=True, quant_scheme=f"{kind}-vllm",
                     lora_configs=[{"path": str(lora_file), "strength": 0.8}])
    rounding = torch.Generator().manual_seed(zlib.crc32(key.encode())) if kind == "fp8" else None
    q, scale = quantize_weight(sd[key] + 0.8 * (up @ down), kind, generator=rounding)
    layer = model.get_submodule(key.removesuffix(".weight"))
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)
    assert torch.equal(model.head.head.weight, sd["head.head.weight"] + 0.8 * head_diff)  # float32 tensors: after
    assert [r.matched for r in model.load_info["loras"]] == [3]
    convert(directory, tmp_path / "converted.safetensors", layout="single", quantize=kind, progress=False,
            loras=(LoraSpec(str(lora_file), 0.8),))
    converted = load_dit(tmp_path / "converted.safetensors")
    assert torch.equal(converted.get_submodule(key.removesuffix(".weight")).weight, q)
