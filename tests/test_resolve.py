"""Model-directory resolution: LightX2V's config keys, official folders, and refusals instead of guesses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from x2v.errors import CheckpointError
from x2v.formats.metadata import EXPERT_METADATA_KEY
from x2v.loading.resolve import Sources, resolve_component, resolve_dit
from x2v.pipelines.settings import resolve_settings


def sources(config: dict) -> Sources:
    """What the loaders get from a config with these keys (through the settings, as a pipeline does)."""
    return resolve_settings(config_json=config).sources


def dit_file(path, metadata=None):
    """A minimal file with DiT marker keys: resolution reads headers only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"head.modulation": torch.zeros(1, 2, 4), "patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2)},
              str(path), metadata=metadata)
    return path


def sharded_dit(directory):
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, key in enumerate(("head.modulation", "patch_embedding.weight")):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({key: torch.zeros(2)}, str(directory / shard))
        weight_map[key] = shard
    index = directory / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_official_wan21_directory(tmp_path):
    index = sharded_dit(tmp_path)
    torch.save({}, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save({}, tmp_path / "Wan2.1_VAE.pth")
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    assert resolve_dit(tmp_path)["dit"].path == index
    assert resolve_component("t5", tmp_path).path.name == "models_t5_umt5-xxl-enc-bf16.pth"
    assert resolve_component("vae", tmp_path).path.name == "Wan2.1_VAE.pth"
    assert resolve_component("tokenizer", tmp_path).path == tmp_path / "google" / "umt5-xxl"
    with pytest.raises(CheckpointError, match="Only Wan2.1 I2V.*clip_original_ckpt"):
        resolve_component("clip", tmp_path)


def test_one_dit_among_other_safetensors_is_picked(tmp_path):
    dit = dit_file(tmp_path / "wan2.1_t2v_14b_lightx2v_4step.safetensors")
    save_file({"shared.weight": torch.zeros(4, 2)}, str(tmp_path / "umt5_xxl_fp16.safetensors"))
    save_file({"decoder.conv1.weight": torch.zeros(2)}, str(tmp_path / "wan_2.1_vae.safetensors"))
    found = resolve_dit(tmp_path)["dit"]
    assert found.path == dit and "only DiT checkpoint" in found.how


def test_three_precision_variants_are_an_error_until_one_is_named(tmp_path):
    names = ["wan_bf16.safetensors", "wan_scaled_fp8_e4m3.safetensors", "wan_int8.safetensors"]
    for name in names:
        dit_file(tmp_path / name)
    with pytest.raises(CheckpointError, match="3 DiT checkpoints.*dit_original_ckpt") as err:
        resolve_dit(tmp_path)
    assert all(n in str(err.value) for n in names)
    chosen = resolve_dit(tmp_path, sources({"dit_original_ckpt": str(tmp_path / names[0])}))["dit"]
    assert chosen.path.name == names[0] and chosen.how == "config key dit_original_ckpt"
    quantized = resolve_dit(tmp_path, sources({"dit_quantized": True, "dit_quantized_ckpt": str(tmp_path / names[2]),
                                       "dit_original_ckpt": str(tmp_path / names[0])}))["dit"]
    assert quantized.path.name == names[2]


def test_wan22_experts_by_folder_and_by_symmetric_keys(tmp_path):
    high = sharded_dit(tmp_path / "high_noise_model")
    low = sharded_dit(tmp_path / "low_noise_model")
    found = resolve_dit(tmp_path)
    assert (found["high_noise_model"].path, found["low_noise_model"].path) == (high, low)
    fp8_high = dit_file(tmp_path / "q" / "high_fp8.safetensors")
    fp8_low = dit_file(tmp_path / "q" / "low_fp8.safetensors")
    config = {"dit_quantized": True, "high_noise_quantized_ckpt": str(fp8_high),
              "low_noise_quantized_ckpt": str(fp8_low), "low_noise_original_ckpt": str(low)}
    found = resolve_dit(tmp_path, sources(config))
    assert (found["high_noise_model"].path, found["low_noise_model"].path) == (fp8_high, fp8_low)


def test_global_dit_key_does_not_override_both_experts(tmp_path):
    sharded_dit(tmp_path / "high_noise_model")
    sharded_dit(tmp_path / "low_noise_model")
    with pytest.raises(CheckpointError, match="high_noise_original_ckpt and low_noise_original_ckpt"):
        resolve_dit(tmp_path, sources({"dit_original_ckpt": str(tmp_path / "high_noise_model")}))


def test_missing_expert_is_named(tmp_path):
    sharded_dit(tmp_path / "high_noise_model")
    with pytest.raises(CheckpointError, match="no low_noise_model found.*low_noise_original_ckpt"):
        resolve_dit(tmp_path, sources({"model_cls": "wan2.2_moe"}))


def test_expert_files_without_folders_need_keys_or_metadata(tmp_path):
    dit_file(tmp_path / "a.safetensors")
    dit_file(tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="cannot be told apart"):
        resolve_dit(tmp_path, sources({"model_cls": "wan2.2_moe"}))
    dit_file(tmp_path / "a.safetensors", {EXPERT_METADATA_KEY: "high_noise_model"})
    dit_file(tmp_path / "b.safetensors", {EXPERT_METADATA_KEY: "low_noise_model"})
    found = resolve_dit(tmp_path, sources({"model_cls": "wan2.2_moe"}))
    assert found["high_noise_model"].path.name == "a.safetensors"
    assert "metadata" in found["low_noise_model"].how


def test_diffusers_repository_experts(tmp_path):
    dit_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    dit_file(tmp_path / "transformer_2" / "diffusion_pytorch_model.safetensors")
    found = resolve_dit(tmp_path)
    assert found["high_noise_model"].path.parent.name == "transformer"
    assert found["low_noise_model"].path.parent.name == "transformer_2"


def test_legacy_lightx2v_folders(tmp_path):
    dit_file(tmp_path / "fp8" / "model.safetensors")
    found = resolve_dit(tmp_path)["dit"]
    assert found.path.parent.name == "fp8" and "legacy" in found.how
    dit_file(tmp_path / "original" / "model.safetensors")
    with pytest.raises(CheckpointError, match="2 legacy LightX2V folders"):
        resolve_dit(tmp_path)


def test_block_split_folder_is_one_checkpoint(tmp_path):
    dit_file(tmp_path / "non_block.safetensors")
    save_file({"blocks.0.modulation": torch.zeros(1)}, str(tmp_path / "block_0.safetensors"))
    assert resolve_dit(tmp_path)["dit"].path == tmp_path


def test_explicit_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="set by config key vae_path"):
        resolve_component("vae", tmp_path, sources({"vae_path": str(tmp_path / "missing.pth")}))


def test_lightx2v_converter_parts_with_an_index_are_one_checkpoint(tmp_path):
    """LightX2V's converter writes <name>_part1.safetensors, _part2 ... and a diffusion_pytorch_model index naming
    them: every file an index names belongs to it, whatever its name (not "3 DiT checkpoints found")."""
    from safetensors.torch import load_file

    from x2v.demo import write_tiny_model
    from x2v.pipelines.wan import Pipeline

    official = write_tiny_model(tmp_path / "official", "t2v")
    parts = tmp_path / "lightx2v"
    parts.mkdir()
    weight_map = {}
    for i, shard in enumerate(sorted(official.glob("diffusion_pytorch_model-*.safetensors")), start=1):
        tensors = load_file(shard)
        save_file(tensors, str(parts / f"wan2.1_t2v_part{i}.safetensors"))
        weight_map.update(dict.fromkeys(tensors, f"wan2.1_t2v_part{i}.safetensors"))
    index = parts / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert resolve_dit(parts)["dit"].path == index
    for item in official.iterdir():  # the other components beside it: a complete model folder
        if not item.name.startswith("diffusion_pytorch_model"):
            (parts / item.name).symlink_to(item)
    small = {"target_height": 32, "target_width": 32, "target_video_length": 5, "infer_steps": 2}
    videos = [Pipeline.from_pretrained(path, device="cpu", **small).generate("a cat", seed=1, progress=False).frames
              for path in (official, parts)]
    assert (videos[0] == videos[1]).all()
