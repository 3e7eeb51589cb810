"""x2v inspect: every component of a model directory, its facts, and its problems with their fixes."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import save_file

from x2v.cli.main import main
from x2v.demo import write_demo_model
from x2v.formats.readers import read_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("inspect") / "tiny")


def run(capsys, *args):
    code = main(["inspect", *map(str, args)])
    return code, capsys.readouterr().out


def test_complete_directory(model_dir, capsys):
    code, out = run(capsys, model_dir, "--json")
    reports = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert set(reports) == {"dit", "t5", "tokenizer", "vae"}  # no CLIP: a T2V model does not need it
    dit = reports["dit"]
    assert dit["container"].startswith("sharded safetensors (2 shards")
    assert dit["architecture"]["model_type"] == "t2v" and dit["tasks"] == ["t2v", "t2i"]
    assert dit["quantization"] == "none" and dit["dtypes"] == {"float32": dit["tensors"]}
    assert reports["vae"]["variant"] == "Wan2.1 VAE (z_dim 16)"
    assert reports["t5"]["dtypes"] == {"bfloat16": reports["t5"]["tensors"]}
    assert all(not r["problems"] for r in reports.values())


def test_a_path_that_does_not_exist_is_one_problem(tmp_path, capsys):
    code, out = run(capsys, tmp_path / "nowhere")
    assert code == 1 and out.count("no such file or folder") == 1


def test_problems_make_the_exit_status_non_zero(model_dir, tmp_path, capsys):
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    (broken / "Wan2.1_VAE.pth").unlink()
    shard = next(broken.glob("diffusion_pytorch_model-00001-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated download
    code, out = run(capsys, broken)
    assert code == 1
    assert "truncated file" in out and "100 missing" in out
    assert "no VAE found" in out and "vae_path" in out
    assert out.strip().endswith("cannot load as is: fix the problems above")


def test_config_keys_choose_among_variants(model_dir, tmp_path, capsys):
    variants = shutil.copytree(model_dir, tmp_path / "variants")
    for shard in variants.glob("diffusion_pytorch_model*"):
        shard.unlink()
    dit = read_checkpoint(model_dir / "diffusion_pytorch_model.safetensors.index.json")
    for name in ("wan_bf16.safetensors", "wan_other.safetensors"):
        save_file({k: v.contiguous() for k, v in dit.items()}, str(variants / name))
    code, out = run(capsys, variants)
    assert code == 1 and "2 DiT checkpoints" in out and "dit_original_ckpt" in out
    config = tmp_path / "config.json"
    config.write_text('{\n  // LightX2V style, with a comment\n  "dit_original_ckpt": "%s",\n}'
                      % (variants / "wan_bf16.safetensors"))
    code, out = run(capsys, variants, "--config", config)
    assert "found by: config key dit_original_ckpt" in out


def wan22_pair(model_dir, root):
    """A Wan2.2-style root: the tiny DiT twice as high/low-noise experts, encoders and VAE beside them."""
    shutil.copytree(model_dir, root)
    for expert in ("high_noise_model", "low_noise_model"):
        (root / expert).mkdir()
        for f in list(root.glob("diffusion_pytorch_model*")) + [root / "config.json"]:
            shutil.copy(f, root / expert / f.name)
    for f in list(root.glob("diffusion_pytorch_model*")) + [root / "config.json"]:
        f.unlink()
    return root


def test_wan22_experts_are_inspected_and_loaded_by_name(model_dir, tmp_path, capsys):
    import torch

    from x2v.loading.dit import load_dit

    root = wan22_pair(model_dir, tmp_path / "wan22")
    code, out = run(capsys, root, "--json")
    reports = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and {"high_noise_model", "low_noise_model"} <= set(reports)
    assert reports["high_noise_model"]["how"] == "the high_noise_model/ folder"
    with pytest.raises(Exception, match="pass expert="):
        load_dit(root)
    high = load_dit(root, expert="high_noise_model")
    reference = load_dit(model_dir)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(high.state_dict()[name], tensor, rtol=0, atol=0)


def test_quantized_file_is_reported_with_its_encoding(model_dir, tmp_path, capsys):
    import torch

    tensors = read_checkpoint(model_dir / "diffusion_pytorch_model.safetensors.index.json")
    quantized = {}
    for name, t in tensors.items():
        if name.endswith(("ffn.0.weight", "ffn.2.weight")):
            scale = t.abs().amax(dim=1, keepdim=True) / 127
            quantized[name] = (t / scale).round().clamp(-128, 127).to(torch.int8)
            quantized[name.replace(".weight", ".weight_scale")] = scale
        else:
            quantized[name] = t.contiguous()
    save_file(quantized, str(tmp_path / "wan_int8_lightx2v.safetensors"))
    code, out = run(capsys, tmp_path / "wan_int8_lightx2v.safetensors")
    assert "quantization: lightx2v-int8" in out
    config = tmp_path / "c.json"
    config.write_text('{"dit_quantized": true, "dit_quant_scheme": "fp8-vllm"}')
    code, out = run(capsys, tmp_path / "wan_int8_lightx2v.safetensors", "--config", config)
    assert code == 1 and "int8" in out and "fp8-vllm" in out


def test_block_split_folder_loads_the_same_model(model_dir, tmp_path):
    import torch

    from x2v.loading.dit import load_dit

    tensors = read_checkpoint(model_dir / "diffusion_pytorch_model.safetensors.index.json")
    split = tmp_path / "lazy"
    split.mkdir()
    blocks = {}
    for name, t in tensors.items():
        index = name.split(".")[1] if name.startswith("blocks.") else None
        blocks.setdefault(index, {})[name] = t.contiguous()
    save_file(blocks.pop(None), str(split / "non_block.safetensors"))
    for index, part in blocks.items():
        save_file(part, str(split / f"block_{index}.safetensors"))
    shutil.copy(model_dir / "config.json", split / "config.json")
    loaded, reference = load_dit(split).state_dict(), load_dit(model_dir).state_dict()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
