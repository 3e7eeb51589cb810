"""``x2v convert`` on tiny models: round trips between layouts, quantization bounds, ComfyUI export, expert metadata,
complete model folders that generate, bounded memory on a larger checkpoint, and interrupted runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ckpt_utils import relative_l2
from safetensors import safe_open
from safetensors.torch import save_file

import x2v
from x2v.cli.main import main
from x2v.convert import ConversionError, convert, parse_lora
from x2v.convert.layouts import parse_size
from x2v.demo import DEMO_DIT, write_tiny_model
from x2v.formats import t5_keys
from x2v.formats.metadata import from_metadata
from x2v.formats.quant import detect_encoding
from x2v.formats.readers import SAFETENSORS_DTYPES, read_checkpoint, read_safetensors_header, safetensors_metadata
from x2v.formats.writers import SafetensorsWriter, TensorSpec, is_temp, publish, temp_path
from x2v.loading.resolve import resolve_dit
from x2v.loading.weights import build_on_meta
from x2v.models.wan_dit import WanDiT, WanDiTConfig
from x2v.ops.quant_math import quantize_weight

INDEX = "diffusion_pytorch_model.safetensors.index.json"
# Relative L2 error of the forward against the float model; measured on the tiny T2V DiT: int8 1.1e-3, fp8 4.9e-3
# (ComfyUI per-tensor fp8 4.5e-3); tiny CLIP fp8 1.0e-2.
FORWARD_BOUND = {"int8": 5e-3, "fp8": 2e-2}
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: write_tiny_model(root / kind, kind) for kind in ("t2v", "i2v", "moe_t2v")}


def official(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the one DiT in a folder, as the loader finds it."""
    return read_checkpoint(resolve_dit(path)["dit"].path)


def forward(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, DEMO_DIT.in_dim, 2, 4, 4, generator=g)
    context = torch.randn(1, 5, DEMO_DIT.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), context)


def assert_aligned(path: Path) -> None:
    """Every tensor starts at a multiple of its element size, so readers map it without a copy."""
    header, start = read_safetensors_header(path)
    for name, info in header.items():
        if name != "__metadata__":
            assert (start + info["data_offsets"][0]) % SAFETENSORS_DTYPES[info["dtype"]].itemsize == 0, name


# --- the streaming writer ------------------------------------------------------------------------------------------

def test_writer_writes_files_the_safetensors_library_reads(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.tensor(2.5),
               "d": torch.randn(4, 4).to(torch.float8_e4m3fn), "e": torch.tensor([True, False])}
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, specs, {"x2v_layout": "single"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        assert not path.exists() and writer.temp.is_file() and is_temp(writer.temp)
    publish([path])
    assert not temp_path(path).exists()
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"x2v_layout": "single"}
        for name, tensor in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got.reshape(-1).view(torch.uint8),
                                                             tensor.reshape(-1).view(torch.uint8)), name
    # Wrong order, dtype or shape is refused; an exception removes the temporary file.
    with pytest.raises(ValueError, match="expected a"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as writer:
            writer.write("b", tensors["b"])
    assert not temp_path(tmp_path / "x.safetensors").exists()


def test_sizes_and_lora_arguments():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5MiB") == int(1.5 * 2**20) and parse_size("300") == 300
    with pytest.raises(ValueError):
        parse_size("five")
    assert parse_lora("a/b.safetensors") == parse_lora("a/b.safetensors:1")
    spec = parse_lora("C:/loras/x.safetensors:0.75@low_noise_model")
    assert (spec.path, spec.strength, spec.expert) == ("C:/loras/x.safetensors", 0.75, "low_noise_model")
    assert parse_lora("x.safetensors@high").expert == "high_noise_model"


# --- layouts ---------------------------------------------------------------------------------------------------

def test_official_single_diffusers_official_round_trip_is_identical(tiny, tmp_path):
    source = official(tiny["t2v"])
    convert(tiny["t2v"], tmp_path / "one.safetensors", layout="single", **QUIET)
    convert(tmp_path / "one.safetensors", tmp_path / "diffusers", layout="diffusers", shard_size=200_000, **QUIET)
    convert(tmp_path / "diffusers", tmp_path / "back", layout="official", shard_size=300_000, **QUIET)

    diffusers_keys = read_checkpoint(tmp_path / "diffusers" / INDEX)
    assert "condition_embedder.time_proj.weight" in diffusers_keys and "blocks.0.attn1.to_q.weight" in diffusers_keys
    config = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["num_attention_heads"] == DEMO_DIT.num_heads
    assert len(list((tmp_path / "back").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    back = official(tmp_path / "back")
    assert set(back) == set(source)
    for key, tensor in source.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_layers"] == DEMO_DIT.num_layers


def test_diffusers_layout_loads_in_diffusers(tiny, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    convert(tiny["i2v"], tmp_path / "transformer", layout="diffusers", **QUIET)
    model, info = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "transformer", output_loading_info=True)
    assert not any(info.values()), info
    written = read_checkpoint(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert set(state) == set(written) and all(torch.equal(state[k], written[k]) for k in written)


def test_block_split_and_dtype(tiny, tmp_path):
    source = official(tiny["t2v"])
    convert(tiny["t2v"], tmp_path / "split", layout="block-split", dtype=torch.bfloat16, **QUIET)
    names = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert names == ["block_0.safetensors", "block_1.safetensors", "config.json", INDEX, "non_block.safetensors"]
    assert set(read_checkpoint(tmp_path / "split" / "block_1.safetensors")) == {
        k for k in source if k.startswith("blocks.1.")}
    back = read_checkpoint(tmp_path / "split")
    for key, tensor in source.items():
        assert back[key].dtype == torch.bfloat16 and torch.equal(back[key], tensor.bfloat16()), key
    model = x2v.load_dit(tmp_path / "split", dtype=torch.float32)
    reference = x2v.load_dit(tiny["t2v"], dtype=torch.float32)
    assert relative_l2(forward(model), forward(reference)) < 1e-2  # bf16 storage only


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_file_is_within_the_quantization_bound(tiny, tmp_path, kind):
    source = official(tiny["t2v"])
    result = convert(tiny["t2v"], tmp_path / "q", quantize=kind, **QUIET)
    tensors = official(tmp_path / "q")
    encoding = detect_encoding(tensors)
    assert encoding.name == f"lightx2v-{kind}"
    assert len(encoding.layers) == DEMO_DIT.num_layers * 10  # self_attn qkvo, cross_attn qkvo, ffn.0, ffn.2
    assert encoding.unusual_layers == ()
    for layer in encoding.layers:
        weight, scale = source[f"{layer}.weight"], tensors[f"{layer}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (weight.shape[0], 1)
        error = (tensors[f"{layer}.weight"].float() * scale - weight).abs()
        # Round to nearest: half an int8 step; fp8 e4m3 keeps 3 mantissa bits (half-ulp 2^-4), subnormals 2^-10.
        bound = scale / 2 if kind == "int8" else weight.abs() / 16 + scale * 2**-10
        assert (error <= bound * (1 + 1e-5) + 1e-12).all(), layer
    assert tensors["blocks.0.norm3.weight"].dtype == source["blocks.0.norm3.weight"].dtype
    assert_aligned(tmp_path / "q" / "diffusion_pytorch_model.safetensors")
    meta = from_metadata(safetensors_metadata(next((tmp_path / "q").glob("*.safetensors"))))
    assert meta["encoding"] == f"lightx2v-{kind}" and meta["quant_scheme"] == f"{kind}-vllm"
    assert meta["model_type"] == "t2v" and meta["source"].endswith(INDEX)
    assert "lightx2v" in result.report()

    model = x2v.load_dit(tmp_path / "q", dtype=torch.float32)  # no dit_quant_scheme needed
    reference = x2v.load_dit(tiny["t2v"], dtype=torch.float32)
    assert relative_l2(forward(model), forward(reference)) <= FORWARD_BOUND[kind]


def test_comfyui_scaled_fp8_export_loads_back_and_converts_exactly(tiny, tmp_path):
    file = tmp_path / "wan_fp8_scaled.safetensors"
    convert(tiny["t2v"], file, layout="comfyui", quantize="fp8", **QUIET)
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
        marker = f.get_tensor("model.diffusion_model.scaled_fp8")
        scale = f.get_tensor("model.diffusion_model.blocks.0.ffn.0.scale_weight")
        assert f.metadata()["x2v_layout"] == "comfyui" and f.metadata()["x2v_encoding"] == "comfy-scaled-fp8"
    assert all(k.startswith("model.diffusion_model.") for k in keys)
    assert not any(k.endswith("weight_scale") for k in keys)
    assert marker.dtype == torch.float8_e4m3fn and scale.dim() == 0 and scale.dtype == torch.float32
    assert_aligned(file)
    model = x2v.load_dit(file, dtype=torch.float32)
    assert model.load_info["encoding"] == "comfy-scaled-fp8"
    reference = x2v.load_dit(tiny["t2v"], dtype=torch.float32)
    assert relative_l2(forward(model), forward(reference)) <= FORWARD_BOUND["fp8"]

    # Per-tensor -> LightX2V per-channel keeps every fp8 value; the scale is the same number per row.
    convert(file, tmp_path / "lightx2v.safetensors", **QUIET)
    comfy, lightx2v = read_checkpoint(file), read_checkpoint(tmp_path / "lightx2v.safetensors")
    q = lightx2v["blocks.0.ffn.0.weight"]
    assert torch.equal(q.view(torch.uint8), comfy["model.diffusion_model.blocks.0.ffn.0.weight"].view(torch.uint8))
    assert torch.equal(lightx2v["blocks.0.ffn.0.weight_scale"], scale.expand(q.shape[0], 1))
    # ... and back to float: plain ComfyUI names, bf16 by default.
    convert(tmp_path / "lightx2v.safetensors", tmp_path / "plain.safetensors", layout="comfyui", quantize="none",
            **QUIET)
    plain = read_checkpoint(tmp_path / "plain.safetensors")
    assert "model.diffusion_model.scaled_fp8" not in plain
    assert plain["model.diffusion_model.blocks.0.ffn.0.weight"].dtype == torch.bfloat16


def test_quantized_source_is_kept_bit_for_bit(tiny, tmp_path):
    convert(tiny["t2v"], tmp_path / "int8.safetensors", quantize="int8", **QUIET)
    convert(tmp_path / "int8.safetensors", tmp_path / "split", layout="block-split", **QUIET)
    a, b = read_checkpoint(tmp_path / "int8.safetensors"), read_checkpoint(tmp_path / "split")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConversionError, match="scaled fp8 only"):
        convert(tmp_path / "int8.safetensors", tmp_path / "c.safetensors", layout="comfyui", **QUIET)


# --- LoRA --------------------------------------------------------------------------------------------------------

def write_lora(path: Path, dim: int = DEMO_DIT.dim, rank: int = 4, seed: int = 0) -> Path:
    """A LightX2V/ComfyUI-style LoRA: two pairs (one with alpha), a bias diff and a modulation diff."""
    g = torch.Generator().manual_seed(seed)
    p = "diffusion_model.blocks."
    tensors = {
        f"{p}0.self_attn.q.lora_up.weight": torch.randn(dim, rank, generator=g) * 0.1,
        f"{p}0.self_attn.q.lora_down.weight": torch.randn(rank, dim, generator=g) * 0.1,
        f"{p}0.self_attn.q.alpha": torch.tensor(2.0),
        f"{p}1.ffn.0.lora_up.weight": torch.randn(DEMO_DIT.ffn_dim, rank, generator=g) * 0.1,
        f"{p}1.ffn.0.lora_down.weight": torch.randn(rank, dim, generator=g) * 0.1,
        f"{p}1.cross_attn.o.diff_b": torch.randn(dim, generator=g) * 0.01,
        f"{p}0.diff_m": torch.randn(1, 6, dim, generator=g) * 0.01,
    }
    save_file(tensors, str(path))
    return path


def test_lora_merged_file_equals_the_online_merge(tiny, tmp_path):
    lora = write_lora(tmp_path / "style.safetensors")
    result = convert(tiny["t2v"], tmp_path / "merged.safetensors", loras=(parse_lora(f"{lora}:0.8"),), **QUIET)
    assert "matched 7 of 7 tensors" in result.report()
    online = x2v.load_dit(tiny["t2v"], dtype=torch.float32, lora_configs=[{"path": str(lora), "strength": 0.8}])
    offline = x2v.load_dit(tmp_path / "merged.safetensors", dtype=torch.float32)
    base = official(tiny["t2v"])
    changed = 0
    for key, tensor in online.state_dict().items():
        assert torch.equal(offline.state_dict()[key], tensor), key
        changed += not torch.equal(tensor, base[key])
    assert changed == 4
    recorded = json.loads(safetensors_metadata(tmp_path / "merged.safetensors")["x2v_loras"])
    assert recorded == [{"path": str(lora), "strength": 0.8}]
    # Merged before quantizing: the int8 file is within the quantization bound of the merged model.
    convert(tiny["t2v"], tmp_path / "merged_int8.safetensors", quantize="int8", loras=(parse_lora(f"{lora}:0.8"),),
            **QUIET)
    quantized = x2v.load_dit(tmp_path / "merged_int8.safetensors", dtype=torch.float32)
    assert relative_l2(forward(quantized), forward(online)) <= FORWARD_BOUND["int8"]


def test_lora_per_wan22_expert(tiny, tmp_path):
    lora = write_lora(tmp_path / "high.safetensors")
    with pytest.raises(ValueError, match="needs \"name\""):
        convert(tiny["moe_t2v"], tmp_path / "x", loras=(parse_lora(str(lora)),), **QUIET)
    convert(tiny["moe_t2v"], tmp_path / "moe", layout="single", loras=(parse_lora(f"{lora}@high"),), **QUIET)
    for expert, changed in (("high_noise_model", True), ("low_noise_model", False)):
        out = read_checkpoint(tmp_path / "moe" / expert / "diffusion_pytorch_model.safetensors")
        src = official(tiny["moe_t2v"] / expert)
        assert torch.equal(out["blocks.0.self_attn.q.weight"], src["blocks.0.self_attn.q.weight"]) != changed
    with pytest.raises(ConversionError, match="not a Wan2.2 expert"):
        convert(tiny["t2v"], tmp_path / "y.safetensors", loras=(parse_lora(f"{lora}@low"),), **QUIET)


# --- Wan2.2 experts and complete model folders -----------------------------------------------------------------------

def test_wan22_experts_carry_their_identity(tiny, tmp_path):
    result = convert(tiny["moe_t2v"], tmp_path / "moe", layout="single", **QUIET)
    assert len(result.files) == 4  # two experts: file + config.json each
    files = {}
    for expert in ("high_noise_model", "low_noise_model"):
        file = tmp_path / "moe" / expert / "diffusion_pytorch_model.safetensors"
        assert safetensors_metadata(file)["wan_expert"] == expert
        files[expert] = file
    # Renamed and side by side, the files still say which expert they are (no folder names needed).
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, (expert, file) in enumerate(files.items()):
        os.link(file, flat / f"expert_{1 - i}.safetensors")
    found = resolve_dit(flat)
    assert found["high_noise_model"].path.name == "expert_1.safetensors"
    assert "metadata" in found["high_noise_model"].how
    # One expert alone, and a lone expert file relabelled.
    convert(tiny["moe_t2v"], tmp_path / "low.safetensors", expert="low_noise_model", **QUIET)
    assert safetensors_metadata(tmp_path / "low.safetensors")["wan_expert"] == "low_noise_model"
    with pytest.raises(ConversionError, match="metadata says low_noise_model"):
        convert(tmp_path / "low.safetensors", tmp_path / "x.safetensors", expert="high_noise_model", **QUIET)


def test_copy_components_gives_a_folder_generate_runs(tiny, tmp_path, capsys):
    out = tmp_path / "i2v_int8"
    assert main(["convert", str(tiny["i2v"]), str(out), "--quantize", "int8", "--copy-components", "--quiet"]) == 0
    assert "lightx2v-int8" in capsys.readouterr().out
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "config.json", "diffusion_pytorch_model.safetensors",
            "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"} <= names
    assert any(n.startswith("google/umt5-xxl/") for n in names)
    assert not any(is_temp(Path(n)) for n in names)
    video = tmp_path / "v.mp4"
    image = tmp_path / "cat.png"
    from PIL import Image

    Image.new("RGB", (48, 32), (200, 120, 40)).save(image)
    assert main(["generate", "--model_path", str(out), "--prompt", "a cat", "--image_path", str(image),
                 "--num_frames", "5", "--infer_steps", "2", "--height", "32", "--width", "32",
                 "--save_result_path", str(video), "--device", "cpu"]) == 0
    assert video.stat().st_size > 0
    capsys.readouterr()
    # Converting again into the same folder needs --overwrite; the error is one line naming the file.
    assert main(["convert", str(tiny["i2v"]), str(out), "--copy-components", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and "--overwrite" in err


def test_inspect_shows_what_the_converter_recorded(tiny, tmp_path):
    convert(tiny["moe_t2v"], tmp_path / "moe", quantize="fp8", **QUIET)
    reports = x2v.inspect_model(tmp_path / "moe")
    converted = reports[0].facts["converted_by_x2v"]
    assert converted["expert"] == "high_noise_model" and converted["encoding"] == "lightx2v-fp8"
    assert converted["source"].endswith(INDEX)


# --- T5 and CLIP --------------------------------------------------------------------------------------------------

def test_t5_and_clip_quantized_files(tiny, tmp_path):
    t5_source = read_checkpoint(tiny["i2v"] / "models_t5_umt5-xxl-enc-bf16.pth")
    convert(tiny["i2v"], tmp_path, component="t5", quantize="int8", **QUIET)
    t5 = torch.load(tmp_path / "models_t5_umt5-xxl-enc-int8.pth", weights_only=True)
    q, scale = t5["blocks.0.ffn.fc1.weight"], t5["blocks.0.ffn.fc1.weight_scale"]
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (q.shape[0], 1)
    assert (q.float() * scale - t5_source["blocks.0.ffn.fc1.weight"].float()).abs().max() <= scale.max() / 2 + 1e-3
    assert t5["token_embedding.weight"].dtype == torch.bfloat16 and t5["blocks.0.norm1.weight"].dtype == torch.bfloat16
    assert set(t5) - set(t5_source) == {k + "_scale" for k, v in t5.items() if v.dtype == torch.int8}
    # The loader runs it (no t5_quant_scheme needed); measured relative error 1.2e-2 on this tiny encoder.
    ids = torch.randint(3, 20, (1, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 7, dtype=torch.long)
    encoders = [x2v.load_text_encoder(p, dtype=torch.float32)
                for p in (tmp_path / "models_t5_umt5-xxl-enc-int8.pth", tiny["i2v"])]
    assert relative_l2(encoders[0](ids, mask), encoders[1](ids, mask)) < 2.5e-2

    # ComfyUI-style scaled fp8 umT5 (HF names, per-tensor scale_weight) -> official names, fp8 values kept.
    hf = {t5_keys.official_to_hf_name(k): v.float() for k, v in t5_source.items()}
    comfy = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for name, weight in hf.items():
        if name.endswith(("SelfAttention.q.weight", "DenseReluDense.wo.weight")):
            q, s = quantize_weight(weight.reshape(1, -1), "fp8")
            comfy.update({name: q.reshape(weight.shape), name.replace(".weight", ".scale_weight"): s.reshape(())})
        else:
            comfy[name] = weight.bfloat16()
    save_file(comfy, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    convert(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", tmp_path / "t5_fp8.pth", component="t5", **QUIET)
    t5 = torch.load(tmp_path / "t5_fp8.pth", weights_only=True)
    assert torch.equal(t5["blocks.1.ffn.fc2.weight"].view(torch.uint8),
                       comfy["encoder.block.1.layer.1.DenseReluDense.wo.weight"].view(torch.uint8))
    assert t5["blocks.1.ffn.fc2.weight_scale"].shape == (t5["blocks.1.ffn.fc2.weight"].shape[0], 1)
    assert t5["blocks.1.ffn.fc1.weight"].dtype == torch.bfloat16  # the file's float layers stay as they are

    # The official CLIP file is kept whole (text tower too); only the vision blocks' linears are quantized.
    clip_file = tiny["i2v"] / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    clip_source = dict(read_checkpoint(clip_file), **{"textual.head.weight": torch.randn(8, 8).half(),
                                                      "log_scale": torch.tensor(4.6)})
    torch.save(clip_source, tmp_path / "clip_full.pth")
    convert(tmp_path / "clip_full.pth", tmp_path, component="clip", quantize="fp8", **QUIET)
    clip = torch.load(tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14-fp8.pth", weights_only=True)
    assert torch.equal(clip["textual.head.weight"], clip_source["textual.head.weight"]) and "log_scale" in clip
    assert clip["visual.transformer.0.attn.to_qkv.weight"].dtype == torch.float8_e4m3fn
    assert clip["visual.transformer.0.mlp.2.weight_scale"].dtype == torch.float32
    assert clip["visual.patch_embedding.weight"].dtype == torch.float16
    image = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    towers = [x2v.load_image_encoder(p, dtype=torch.float32)
              for p in (tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14-fp8.pth", tiny["i2v"])]
    assert relative_l2(towers[0](image), towers[1](image)) < FORWARD_BOUND["fp8"]  # measured 1e-2


# --- memory and interruption ---------------------------------------------------------------------------------------

BIG = WanDiTConfig(dim=1024, ffn_dim=2048, num_heads=8, num_layers=5, text_dim=256, freq_dim=256)  # 8 MB tensors


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    """A ~250 MB float32 DiT of ~8 MB tensors, written with the streaming writer (never all in memory)."""
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    meta = build_on_meta(lambda: WanDiT(BIG)).state_dict()
    specs = [TensorSpec(name, torch.float32, tuple(t.shape)) for name, t in meta.items()]
    g = torch.Generator().manual_seed(0)
    with SafetensorsWriter(path, specs) as writer:
        for spec in specs:
            writer.write(spec.name, torch.randn(spec.shape, generator=g).mul_(0.02))
    publish([path])
    return path


PEAK_SCRIPT = """
import json, sys
import torch
from x2v.convert import convert

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: measure the conversion alone
except OSError:
    pass  # then the peak includes start-up (an overestimate)
before = rss("VmRSS:")
convert(sys.argv[1], sys.argv[2], quantize=sys.argv[3], progress=False, shard_size=3 * 10**7)
print(json.dumps({"before": before, "peak": rss("VmHWM:")}))
"""


@pytest.mark.parametrize("quantize", ["int8", "none"])
def test_peak_memory_stays_far_below_the_checkpoint(big_checkpoint, tmp_path, quantize):
    size = big_checkpoint.stat().st_size
    largest = max(t.nbytes for t in read_checkpoint(big_checkpoint).values())
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(big_checkpoint), str(tmp_path / "out"), quantize],
                         capture_output=True, text=True, check=True)
    measured = json.loads(run.stdout.splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    print(f"checkpoint {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB, quantize {quantize}: "
          f"RSS {measured['before'] / 1e6:.0f} MB before, peak growth {growth / 1e6:.1f} MB")
    assert growth < size / 4 and growth < 8 * largest
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1


def test_killed_conversion_leaves_nothing_that_looks_complete(big_checkpoint, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "x2v.cli.main", "convert", str(big_checkpoint), str(out), "--quantize", "fp8",
               "--shard-size", "40MB", "--quiet"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(p.stat().st_size > 2**20 for p in out.iterdir() if is_temp(p))):
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = [p.name for p in out.iterdir()]
    assert left and all(is_temp(out / name) for name in left), left
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.json"))
    # A new run cleans up after the killed one.
    convert(big_checkpoint, out, quantize="fp8", shard_size=40 * 10**6, **QUIET)
    assert not any(is_temp(p) for p in out.iterdir()) and (out / INDEX).is_file()
