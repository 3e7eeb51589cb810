"""Quantized DiT files written as the releases write them (LightX2V int8/fp8 per channel, ComfyUI scaled fp8).

The quantizers below follow the publishers' recipes and are independent of x2v's code: a loaded weight must be
exactly ``q * scale`` (scale as stored in the file, applied in float32), and the forward must stay close to the
float model's.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_dit import VARIANTS, diffusers_dit, make_inputs, official_state_dict, write_official_dir

from x2v.errors import CheckpointError, UnsupportedModelError
from x2v.formats.quant import FLOAT, check_scheme, detect_encoding, quantized_in_releases
from x2v.loading.dit import load_dit
from x2v.loading.quantized import dequantize
from x2v.ops.quant_linear import QuantLinear, set_quant_mode
from x2v.ops.quant_math import quantize_weight

COMFY_PREFIX = "model.diffusion_model."
# Forward error (relative L2 against the float model) measured on this tiny i2v model over 3 inputs, weight-only /
# 8-bit activations: int8 per channel 5.0e-3 / 6.7e-3, int8 per tensor 6.7e-3 / 8.0e-3, fp8 per channel
# 1.9e-2 / 2.5e-2, fp8 per tensor 2.4e-2 / 3.1e-2. Bounds: about 1.6x the worst.
INT8_BOUND, FP8_BOUND = 1.5e-2, 5e-2


def converter_quantizes(key: str, tensor: torch.Tensor) -> bool:
    """LightX2V converter rule for wan_dit: a 2-D tensor whose third name component is self_attn/cross_attn/ffn."""
    parts = key.split(".")
    return tensor.dim() == 2 and len(parts) > 2 and parts[2] in ("self_attn", "cross_attn", "ffn")


def quantize(weight: torch.Tensor, kind: str, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """LightX2V ``quant.py`` (per channel) / ComfyUI-style per-tensor symmetric quantization."""
    amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
    if kind == "int8":
        scale = amax.clamp(min=1e-5) / 127
        return torch.clamp(torch.round(weight / scale), -128, 127).to(torch.int8), scale
    scale = amax.clamp(min=1e-5) / 448
    return (weight / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


# name -> (weight kind, per channel, scale name, scale dtype on disk, activation scale name, ComfyUI marker, prefix)
FORMATS = {
    "lightx2v-int8": ("int8", True, "weight_scale", torch.bfloat16, None, False, ""),
    "lightx2v-fp8": ("fp8", True, "weight_scale", torch.float32, None, False, ""),
    "comfy-scaled-fp8": ("fp8", False, "scale_weight", torch.float32, "scale_input", True, COMFY_PREFIX),
    "lightx2v-comfyui-fp8": ("fp8", False, "scale_weight", torch.bfloat16, None, True, ""),
    "lightx2v-comfyui-int8": ("int8", False, "scale_weight", torch.float32, None, True, ""),
    "fp8-pertensor": ("fp8", False, "weight_scale", torch.float32, "input_scale", False, ""),
}
ENCODING_OF_FORMAT = {"lightx2v-comfyui-fp8": "comfy-scaled-fp8", "lightx2v-comfyui-int8": "comfy-scaled-int8"}


def write_format(sd: dict[str, torch.Tensor], fmt: str, quantized=converter_quantizes):
    """(file tensors, expected float32 weights of the quantized keys) for one on-disk format."""
    kind, per_channel, scale_name, scale_dtype, input_scale, marker, prefix = FORMATS[fmt]
    tensors, expected = {}, {}
    for key, weight in sd.items():
        if not quantized(key, weight):
            tensors[key] = weight
            continue
        q, scale = quantize(weight.flatten(1), kind, per_channel)
        scale = scale.to(scale_dtype)
        layer = key.removesuffix(".weight")
        tensors[key] = q.reshape(weight.shape)
        tensors[f"{layer}.{scale_name}"] = scale
        if input_scale:
            tensors[f"{layer}.{input_scale}"] = torch.tensor(0.05)
        expected[key] = (q.float() * scale.float()).reshape(weight.shape)
    if marker:
        tensors["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return {prefix + k: v.contiguous() for k, v in tensors.items()}, expected


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    """Tiny Wan2.1 I2V (has k_img/v_img): official state dict, float reference model, inputs and its output."""
    overrides, model_type, x_ch, y_ch, clip_tokens = VARIANTS["i2v"]
    sd = official_state_dict(diffusers_dit(overrides))
    reference = load_dit(write_official_dir(tmp_path_factory.mktemp("float"), sd, model_type), dtype=torch.float32)
    x, y, context, clip, t = make_inputs(x_ch, y_ch, clip_tokens)
    with torch.no_grad():
        want = reference(x, t, context, clip_fea=clip, y=y)
    return sd, reference, (x, y, context, clip, t), want


def save(tmp_path, tensors, name="dit.safetensors"):
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_file_runs_quantized(tmp_path, float_model, fmt):
    """Linear weights stay int8/fp8 with float32 per-channel scales equal to the file's; both execution paths
    (8-bit matmuls, and per-layer dequantization) stay within the bound of the float model."""
    sd, reference, (x, y, context, clip, t), want = float_model
    tensors, expected = write_format(sd, fmt)
    model = load_dit(save(tmp_path, tensors), dtype=torch.float32, architecture=reference.config)
    assert model.load_info["encoding"] == ENCODING_OF_FORMAT.get(fmt, fmt)
    assert len(expected) == 3 * (4 + 6 + 2)  # 3 blocks: self_attn q,k,v,o; cross_attn q,k,v,o,k_img,v_img; ffn 0,2
    for key, weight in expected.items():
        layer = model.get_submodule(key.removesuffix(".weight"))
        assert isinstance(layer, QuantLinear) and layer.weight.dtype == tensors_dtype(tensors, key, fmt)
        assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (weight.shape[0], 1)
        assert torch.equal(layer.dequantized_weight(torch.float32), weight), key
    bound = INT8_BOUND if FORMATS[fmt][0] == "int8" else FP8_BOUND
    for mode in ("weight-only", "w8a8"):
        set_quant_mode(model, mode)
        with torch.no_grad():
            got = model(x, t, context, clip_fea=clip, y=y)
        assert relative_l2(got, want) <= bound, mode


def tensors_dtype(tensors, key, fmt):
    return tensors[FORMATS[fmt][-1] + key].dtype


def test_sharded_directory_with_config_json_and_bf16_default(tmp_path, float_model):
    sd, reference, *_ = float_model
    tensors, expected = write_format(sd, "lightx2v-fp8")
    model = load_dit(write_official_dir(tmp_path, tensors, "i2v"), dit_quantized=True, quant_scheme="fp8-vllm")
    layer = model.blocks[1].ffn[0]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.compute_dtype == torch.bfloat16  # default compute
    assert model.blocks[1].norm3.weight.dtype == torch.float32
    assert torch.equal(layer.dequantized_weight(torch.float32), expected["blocks.1.ffn.0.weight"])
    assert model.config == reference.config


def test_layers_outside_the_release_set(tmp_path, float_model):
    """A quantized conv (5-D patch embedding) and an fp32-kept layer (head) dequantize correctly and are noted."""
    sd, reference, *_ = float_model
    extra = ("patch_embedding.weight", "head.head.weight")
    tensors, expected = write_format(sd, "lightx2v-int8", lambda k, w: converter_quantizes(k, w) or k in extra)
    encoding = detect_encoding(tensors)
    assert set(encoding.unusual_layers) == {"patch_embedding", "head.head"}
    loaded = load_dit(save(tmp_path, tensors), dtype=torch.bfloat16, architecture=reference.config).state_dict()
    assert torch.equal(loaded["patch_embedding.weight"], expected["patch_embedding.weight"].to(torch.bfloat16))
    assert loaded["head.head.weight"].dtype == torch.float32  # kept in float32: dequantized straight to it
    assert torch.equal(loaded["head.head.weight"], expected["head.head.weight"])


def test_release_set_matches_the_converter_rule():
    i2v = official_state_dict(diffusers_dit(VARIANTS["i2v"][0]))
    vace = official_state_dict(diffusers_dit(VARIANTS["t2v"][0], vace_layers=[0, 2]))
    for key, tensor in (i2v | vace).items():
        assert quantized_in_releases(key) == converter_quantizes(key, tensor), key


def test_dequantize_passes_float_tensors_through_and_drops_scales(float_model):
    sd, *_ = float_model
    tensors, _ = write_format(sd, "comfy-scaled-fp8")
    tensors = {k.removeprefix(COMFY_PREFIX): v for k, v in tensors.items()}
    out = dequantize(tensors, detect_encoding(tensors), torch.bfloat16)
    assert set(out) == set(sd)
    assert out["blocks.0.norm3.weight"] is tensors["blocks.0.norm3.weight"]
    assert out["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    assert detect_encoding(sd) == FLOAT
    assert dequantize(sd, FLOAT, torch.float32)["head.modulation"] is sd["head.modulation"]


# --- errors -------------------------------------------------------------------------------------------------------

def small_file(fmt="lightx2v-fp8"):
    """A two-layer quantized state dict, enough for detection and scheme checks."""
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.0.{n}.weight": torch.randn(8, 4, generator=g) for n in ("self_attn.q", "ffn.0")}
    sd["blocks.0.norm3.weight"] = torch.ones(4)
    return write_format(sd, fmt)[0]


def test_fp8_weight_without_scale_is_refused():
    tensors = small_file()
    del tensors["blocks.0.ffn.0.weight_scale"]
    with pytest.raises(CheckpointError, match=r"dit.st: 1 quantized tensor\(s\) without a scale: blocks.0.ffn.0"):
        detect_encoding(tensors, "dit.st")


def test_comfy_fp8_weight_without_scale_weight_is_refused():
    tensors = small_file("lightx2v-comfyui-fp8")
    del tensors["blocks.0.ffn.0.scale_weight"]
    with pytest.raises(CheckpointError, match="without a scale.*scale_weight"):
        detect_encoding(tensors)


@pytest.mark.parametrize("key,value,message", [
    ("blocks.0.ffn.0.weight_scale_2", torch.tensor(1.0), "unrecognized scale tensor.*weight_scale_2"),
    ("blocks.0.ffn.0.input_scale", torch.ones(8, 1), r"unrecognized scale tensor.*input_scale \(8, 1\)"),
    ("blocks.0.norm3.weight_scale", torch.ones(4, 1), "attached to weights that are not int8/fp8"),
    ("blocks.0.missing.weight_scale", torch.ones(8, 1), "without their weight"),
    ("blocks.0.ffn.0.weight_scale", torch.ones(8), r"weight_scale has shape \(8,\).*expected \[8, 1\]"),
    ("blocks.0.ffn.0.weight_scale", torch.ones(8, 1, dtype=torch.float8_e4m3fn), "expected a float32/bfloat16"),
    ("blocks.0.ffn.0.scale_weight", torch.tensor(1.0), "both weight_scale and scale_weight"),
    ("blocks.0.ffn.0.weight", torch.zeros(8, 4, dtype=torch.int8), "mixes weight encodings.*lightx2v-int8"),
    ("scaled_fp8", torch.zeros(2, dtype=torch.float8_e4m3fn), "marker but LightX2V-style weight_scale"),
])
def test_bad_layouts_are_refused(key, value, message):
    tensors = small_file() | {key: value}
    with pytest.raises(CheckpointError, match=message):
        detect_encoding(tensors)


def test_unsupported_layouts_say_not_supported_yet():
    packed = small_file() | {"blocks.0.ffn.0.weight": torch.zeros(8, 2, dtype=torch.uint8)}
    with pytest.raises(UnsupportedModelError, match="NVFP4/MXFP.*not supported yet"):
        detect_encoding(packed)
    wide = {"blocks.0.ffn.0.weight": torch.zeros(256, 384, dtype=torch.float8_e4m3fn),
            "blocks.0.ffn.0.weight_scale": torch.ones(2, 3)}
    with pytest.raises(UnsupportedModelError, match="128x128 block scales"):
        detect_encoding(wide)


def test_scheme_contradicting_the_file_is_refused(tmp_path, float_model):
    sd, reference, *_ = float_model
    path = save(tmp_path, write_format(sd, "lightx2v-int8")[0])
    with pytest.raises(CheckpointError, match="'fp8-vllm' expects fp8 per-channel.*holds int8 per-channel.*int8-vllm"):
        load_dit(path, architecture=reference.config, dit_quantized=True, quant_scheme="fp8-vllm")
    with pytest.raises(CheckpointError, match="declared not quantized.*set dit_quantized true and dit_quant_scheme int8-vllm"):
        load_dit(path, architecture=reference.config, dit_quantized=False)
    float_path = save(tmp_path, sd, "float.safetensors")
    with pytest.raises(CheckpointError, match="dit_quantized is true but this file holds float weights.*"
                                              "Set dit_quant_scheme to an fp8 scheme"):
        load_dit(float_path, architecture=reference.config, dit_quantized=True)


def test_scheme_declarations():
    int8, fp8 = detect_encoding(small_file("lightx2v-int8")), detect_encoding(small_file("lightx2v-fp8"))
    comfy = detect_encoding({k.removeprefix(COMFY_PREFIX): v for k, v in small_file("comfy-scaled-fp8").items()})
    assert (int8.name, fp8.name, comfy.name) == ("lightx2v-int8", "lightx2v-fp8", "comfy-scaled-fp8")
    check_scheme(fp8, None, None, "f")  # nothing declared: x2v detects
    check_scheme(fp8, "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm", True, "f")  # legacy long name
    check_scheme(int8, "W-int8-channel-sym-A-int8-channel-sym-dynamic-Q8F", None, "f")
    check_scheme(comfy, "fp8-sgl", True, "f")  # per-channel kernels run per-tensor scales
    check_scheme(comfy, "fp8-pertensor", True, "f")
    check_scheme(FLOAT, "Default", False, "f")
    with pytest.raises(CheckpointError, match="'fp8-pertensor' expects fp8 per-tensor.*fp8-vllm"):
        check_scheme(fp8, "fp8-pertensor", True, "f")
    with pytest.raises(CheckpointError, match="contradictory settings dit_quantized false and dit_quant_scheme 'fp8-vllm'"):
        check_scheme(fp8, "fp8-vllm", False, "f")
    with pytest.raises(CheckpointError, match="unknown dit_quant_scheme 'fp8'.*Expected one of: Default, fp8-vllm"):
        check_scheme(fp8, "fp8", True, "f")


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp8", "fp8-b128-deepgemm", "W-int4-group128-sym-Marlin"])
def test_unsupported_scheme_lists_supported_ones(scheme):
    fp8 = detect_encoding(small_file("lightx2v-fp8"))
    with pytest.raises(UnsupportedModelError,
                       match=rf"f: dit_quant_scheme '{scheme}' .*recognized but not supported yet.*"
                             r"Supported: Default, fp8-vllm, int8-vllm.*dit_quant_scheme fp8-vllm"):
        check_scheme(fp8, scheme, True, "f")


def test_a_gguf_scheme_on_another_file_is_a_contradiction():
    fp8 = detect_encoding(small_file("lightx2v-fp8"))
    with pytest.raises(CheckpointError, match="f: dit_quant_scheme 'gguf-Q4_K_M' names a GGUF file, but .*Point "
                                              "dit_quantized_ckpt at the .gguf file"):
        check_scheme(fp8, "gguf-Q4_K_M", True, "f")


# --- fp8 without scales: plain casts (scale 1) vs scaled files that lost their scales ------------------------------


def plain_fp8_model(tmp_path, scaled: bool = False, kind: str = "fp8"):
    """The tiny t2v model with its block linear weights stored 8-bit and no scale tensor: cast straight to fp8 (as
    ComfyUI's *_fp8_e4m3fn repacks), or quantized per channel with the scales then dropped (a broken file)."""
    from safetensors.torch import load_file

    from x2v.demo import write_tiny_model
    from x2v.ops.quant_math import QUANT_DTYPES

    model = write_tiny_model(tmp_path / "model", "t2v")
    rounded, total = {}, 0
    for shard in sorted(model.glob("diffusion_pytorch_model-*.safetensors")):
        tensors = load_file(shard)
        for key, tensor in tensors.items():
            if quantized_in_releases(key):
                if scaled or kind == "int8":
                    tensors[key] = quantize_weight(tensor, kind)[0]
                else:
                    tensors[key] = tensor.to(QUANT_DTYPES[kind])
                rounded[key] = tensors[key].float()
        save_file(tensors, str(shard))
        total += sum(t.nbytes for t in tensors.values())
    index = model / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "metadata": {"total_size": total}}))
    return model, rounded


def test_plain_fp8_cast_loads_with_scale_one(tmp_path):
    """ComfyUI's plain fp8 files (no scale_weight, no marker) load as fp8 layers with scale 1, giving the video of
    the float model that holds the very same (rounded) values; inspect names the encoding."""
    import shutil

    from safetensors.torch import load_file

    from x2v.loading.inspect import inspect_model
    from x2v.pipelines.wan import Pipeline

    model, rounded = plain_fp8_model(tmp_path)
    reference = shutil.copytree(model, tmp_path / "float")
    total = 0
    for shard in sorted(reference.glob("diffusion_pytorch_model-*.safetensors")):
        tensors = {k: rounded.get(k, v) for k, v in load_file(shard).items()}
        save_file(tensors, str(shard))
        total += sum(t.nbytes for t in tensors.values())
    index = reference / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "metadata": {"total_size": total}}))
    small = {"target_height": 32, "target_width": 32, "target_video_length": 5, "infer_steps": 2}
    pipes = [Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32, **small) for path in (model, reference)]
    layer = next(iter(pipes[0].dits.values())).blocks[0].ffn[0]
    assert isinstance(layer, QuantLinear) and layer.kind == "fp8"
    assert torch.equal(layer.weight_scale, torch.ones_like(layer.weight_scale))
    videos = [pipe.generate("a cat", seed=2, progress=False).video for pipe in pipes]
    torch.testing.assert_close(videos[0], videos[1], rtol=0, atol=1e-5)
    report = next(r for r in inspect_model(model) if r.component == "dit")
    assert report.facts["quantization"].startswith("plain-fp8 (fp8 per-tensor") and not report.problems


@pytest.mark.parametrize("scaled, kind, message", [
    (True, "fp8", r"without a scale: .*reach the 8-bit range a scale maps"),
    (False, "int8", r"without a scale: .*\(torch.int8\)"),
])
def test_8bit_weights_that_lost_their_scales_stay_refused(tmp_path, scaled, kind, message):
    from x2v.pipelines.wan import Pipeline

    model, _ = plain_fp8_model(tmp_path, scaled=scaled, kind=kind)
    with pytest.raises(CheckpointError, match=message):
        Pipeline.from_pretrained(model, device="cpu")
