"""The DiT against diffusers' WanTransformer3DModel / WanVACETransformer3DModel on tiny random weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ckpt_utils import assert_close_to_scale, randomize_, write_sharded
from x2v.errors import CheckpointError, UnsupportedModelError
from x2v.formats.dit_keys import diffusers_key_to_official, official_key_to_diffusers
from x2v.loading.dit import load_dit
from x2v.loading.weights import build_on_meta
from x2v.models.wan_dit import WanDiT, WanDiTConfig

diffusers = pytest.importorskip("diffusers")

HEADS, HEAD_DIM, TEXT_DIM, IMAGE_DIM, TEXT_LEN = 2, 32, 32, 48, 512
DIM = HEADS * HEAD_DIM

# name -> (diffusers config overrides, official model_type, x channels, y channels, clip tokens per sample)
VARIANTS = {
    "t2v": (dict(in_channels=16, out_channels=16), "t2v", 16, 0, 0),
    "i2v": (dict(in_channels=36, out_channels=16, image_dim=IMAGE_DIM, added_kv_proj_dim=DIM), "i2v", 16, 20, 9),
    "flf2v": (dict(in_channels=36, out_channels=16, image_dim=IMAGE_DIM, added_kv_proj_dim=DIM,
                   pos_embed_seq_len=2 * 9), "flf2v", 16, 20, 9),
    "wan22_i2v": (dict(in_channels=36, out_channels=16), "i2v", 16, 20, 0),
    "ti2v": (dict(in_channels=48, out_channels=48), "ti2v", 48, 0, 0),
}


def diffusers_dit(overrides: dict, vace_layers=None, seed=0):
    common = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, text_dim=TEXT_DIM,
                  freq_dim=16, ffn_dim=96, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                  eps=1e-6, rope_max_seq_len=1024, **overrides)
    if vace_layers is not None:
        model = diffusers.WanVACETransformer3DModel(**common, vace_layers=vace_layers, vace_in_channels=24)
    else:
        model = diffusers.WanTransformer3DModel(**common)
    return randomize_(model, seed=seed, std=0.1).eval()


def official_state_dict(model) -> dict[str, torch.Tensor]:
    return {diffusers_key_to_official(k): v.detach().clone() for k, v in model.state_dict().items()}


def write_official_dir(tmp_path, sd, model_type, num_layers=3, **extra):
    write_sharded(tmp_path, sd, shards=2)
    config = dict(_class_name="WanModel", model_type=model_type, in_dim=sd["patch_embedding.weight"].shape[1],
                  dim=DIM, ffn_dim=96, freq_dim=16, num_heads=HEADS, num_layers=num_layers,
                  out_dim=sd["head.head.weight"].shape[0] // 4, text_len=TEXT_LEN, eps=1e-6, **extra)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def make_inputs(x_ch, y_ch, clip_tokens, flf2v=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    b, f, h, w = 2, 3, 4, 6
    x = torch.randn(b, x_ch, f, h, w, generator=g)
    y = torch.randn(b, y_ch, f, h, w, generator=g) if y_ch else None
    context = torch.randn(b, 7, TEXT_DIM, generator=g)
    clip = torch.randn(b, clip_tokens * (2 if flf2v else 1), IMAGE_DIM, generator=g) if clip_tokens else None
    t = torch.tensor([999.0, 437.0])
    return x, y, context, clip, t


def diffusers_forward(model, x, y, context, clip, t, **kw):
    padded = torch.nn.functional.pad(context, (0, 0, 0, TEXT_LEN - context.shape[1]))
    hidden = torch.cat([x, y], 1) if y is not None else x
    if clip is not None and model.config.pos_embed_seq_len:
        clip = clip.reshape(-1, clip.shape[1] // 2, clip.shape[2])  # diffusers wants [2B, 257, C] for FLF2V
    with torch.no_grad():
        return model(hidden, t, padded, encoder_hidden_states_image=clip, return_dict=False, **kw)[0]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_matches_diffusers(tmp_path, name, dtype, tol):
    overrides, model_type, x_ch, y_ch, clip_tokens = VARIANTS[name]
    oracle = diffusers_dit(overrides)
    sd = official_state_dict(oracle)
    ours = load_dit(write_official_dir(tmp_path, sd, model_type), dtype=dtype)
    assert ours.config.model_type == model_type
    x, y, context, clip, t = make_inputs(x_ch, y_ch, clip_tokens, flf2v=name == "flf2v")
    expected = diffusers_forward(oracle, x, y, context, clip, t)
    with torch.no_grad():
        actual = ours(x, t, context, clip_fea=clip, y=y)
    assert actual.dtype == torch.float32
    assert_close_to_scale(actual, expected, tol)


def test_diffusers_folder_is_read_with_its_config(tmp_path):
    """A diffusers repository's transformer/ (diffusers names and config.json): the head count comes from
    num_attention_heads (2 heads of 32, not dim / 128), so the model computes diffusers' function; a config.json
    that contradicts the weights is refused, naming both."""
    overrides, _, x_ch, _, _ = VARIANTS["t2v"]
    oracle = diffusers_dit(overrides)
    oracle.save_pretrained(tmp_path / "transformer")
    ours = load_dit(tmp_path)
    assert (ours.config.num_heads, ours.config.dim) == (HEADS, DIM)
    x, _, context, _, t = make_inputs(x_ch, 0, 0)
    with torch.no_grad():
        assert_close_to_scale(ours(x, t, context), diffusers_forward(oracle, x, None, context, None, t), 1e-4)
    config_path = tmp_path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_layers": 5, "attention_head_dim": 16}))
    with pytest.raises(CheckpointError, match="dim: weights 64, config.json 32; num_layers: weights 3, config.json 5"):
        load_dit(tmp_path)


def test_ti2v_per_token_timesteps(tmp_path):
    overrides, model_type, x_ch, _, _ = VARIANTS["ti2v"]
    oracle = diffusers_dit(overrides)
    ours = load_dit(write_official_dir(tmp_path, official_state_dict(oracle), model_type))
    x, _, context, _, _ = make_inputs(x_ch, 0, 0)
    tokens = 3 * 2 * 3
    t = torch.full((2, tokens), 700.0)
    t[:, : 2 * 3] = 0.0  # first latent frame is clean (TI2V image-to-video)
    t[1] = 350.0
    expected = diffusers_forward(oracle, x, None, context, None, t)
    with torch.no_grad():
        actual = ours(x, t, context)
        scalar = ours(x, torch.tensor([700.0, 700.0]), context)
        same_per_token = ours(x, torch.full((2, tokens), 700.0), context)
    assert_close_to_scale(actual, expected, 1e-4)
    assert_close_to_scale(same_per_token, scalar, 1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_vace_matches_diffusers(tmp_path, scale):
    layers = [0, 2]
    oracle = diffusers_dit(dict(in_channels=16, out_channels=16), vace_layers=layers)
    oracle_num_layers = oracle.config.num_layers
    sd = official_state_dict(oracle)
    assert "vace_blocks.0.before_proj.weight" in sd and "vace_blocks.1.after_proj.weight" in sd
    ours = load_dit(write_official_dir(tmp_path, sd, "vace", num_layers=oracle_num_layers, vace_layers=layers))
    assert ours.config.vace_layers == (0, 2)
    x, _, context, _, t = make_inputs(16, 0, 0)
    vace_context = torch.randn(2, 24, *x.shape[2:], generator=torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(context, (0, 0, 0, TEXT_LEN - context.shape[1]))
    with torch.no_grad():
        expected = oracle(x, t, padded, control_hidden_states=vace_context,
                          control_hidden_states_scale=torch.full((2,), scale), return_dict=False)[0]
        actual = ours(x, t, context, vace_context=vace_context, vace_scale=scale)
    assert_close_to_scale(actual, expected, 1e-4)


def test_layouts_give_the_same_model(tmp_path):
    """Sharded official, single file without config.json, ComfyUI prefix and diffusers names all agree."""
    oracle = diffusers_dit(VARIANTS["t2v"][0])
    sd = official_state_dict(oracle)
    x, _, context, _, t = make_inputs(16, 0, 0)
    reference = load_dit(write_official_dir(tmp_path / "official", sd, "t2v"))
    layouts = {
        "single": sd,
        "comfy": {f"model.diffusion_model.{k}": v for k, v in sd.items()},
        "diffusers": dict(oracle.state_dict()),
    }
    with torch.no_grad():
        want = reference(x, t, context)
        for name, tensors in layouts.items():
            (tmp_path / name).mkdir()
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name / f"{name}.safetensors"))
            # No config.json: heads cannot be read from shapes for a tiny model, so give the config.
            model = load_dit(tmp_path / name / f"{name}.safetensors", architecture=reference.config)
            torch.testing.assert_close(model(x, t, context), want, rtol=0, atol=0)


def test_pth_checkpoint(tmp_path):
    sd = official_state_dict(diffusers_dit(VARIANTS["t2v"][0]))
    torch.save(sd, tmp_path / "dit.pth")
    model = load_dit(tmp_path / "dit.pth")
    assert model.config.dim == DIM and model.config.num_layers == 3


def test_key_maps_are_inverse():
    keys = diffusers_dit(VARIANTS["flf2v"][0], seed=3).state_dict().keys()
    for key in keys:
        assert official_key_to_diffusers(diffusers_key_to_official(key)) == key
    official = {diffusers_key_to_official(k) for k in keys}
    assert "blocks.0.norm3.weight" in official and "img_emb.emb_pos" in official
    assert official == set(build_on_meta(lambda: WanDiT(WanDiTConfig(
        model_type="flf2v", in_dim=36, dim=DIM, ffn_dim=96, num_heads=HEADS, num_layers=3, text_dim=TEXT_DIM,
        freq_dim=16, image_branch=True, image_dim=IMAGE_DIM, image_tokens=18))).state_dict())


# Reference table (docs/models.md, Tensor and parameter counts): tensors and parameters of every released DiT.
RELEASES = {
    "Wan2.1-T2V-1.3B": (WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), 825, 1_418_996_800),
    "Wan2.1-T2V-14B": (WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), 1095, 14_288_491_584),
    "Wan2.2-I2V-A14B": (WanDiTConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40,
                                     num_layers=40), 1095, 14_288_901_184),
    "Wan2.1-I2V-14B": (WanDiTConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40,
                                    num_layers=40, image_branch=True), 1303, 16_394_878_784),
    "Wan2.1-FLF2V-14B": (WanDiTConfig(model_type="flf2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40,
                                      num_layers=40, image_branch=True, image_tokens=514), 1304, 16_395_536_704),
    "Wan2.2-TI2V-5B": (WanDiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24,
                                    num_layers=30), 825, 4_999_787_712),
    "Wan2.1-VACE-1.3B": (WanDiTConfig(model_type="vace", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                                      vace_layers=tuple(range(0, 30, 2))), 1264, 2_153_972_032),
    "Wan2.1-VACE-14B": (WanDiTConfig(model_type="vace", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                                     vace_layers=tuple(range(0, 40, 5))), 1331, 17_337_592_896),
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_release_sizes_on_meta(release):
    config, tensors, params = RELEASES[release]
    model = build_on_meta(lambda: WanDiT(config))
    sd = model.state_dict()
    assert len(sd) == tensors
    assert sum(t.numel() for t in sd.values()) == params
    # Detection from shapes gives back the same architecture (meta tensors carry shapes).
    from x2v.formats.dit_keys import infer_architecture
    assert WanDiTConfig(**infer_architecture(sd)) == config


def test_animate_is_refused(tmp_path):
    sd = official_state_dict(diffusers_dit(VARIANTS["i2v"][0]))
    sd["motion_encoder.dec.direction.weight"] = torch.zeros(512, 20)
    save_file(sd, str(tmp_path / "animate.safetensors"))
    with pytest.raises(UnsupportedModelError, match="Animate is not supported yet"):
        load_dit(tmp_path / "animate.safetensors")


def test_config_json_contradiction_names_both_variants(tmp_path):
    sd = official_state_dict(diffusers_dit(VARIANTS["t2v"][0]))
    directory = write_official_dir(tmp_path, sd, "t2v")
    config = json.loads((directory / "config.json").read_text())
    config["ffn_dim"] = 128
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="ffn_dim: weights 96, config.json 128"):
        load_dit(directory)


def test_several_candidates_are_an_error_not_a_merge(tmp_path):
    sd = official_state_dict(diffusers_dit(VARIANTS["t2v"][0]))
    save_file(sd, str(tmp_path / "wan_bf16.safetensors"))
    save_file(sd, str(tmp_path / "wan_other.safetensors"))
    with pytest.raises(CheckpointError, match="2 DiT checkpoints.*dit_original_ckpt"):
        load_dit(tmp_path)


def test_quantized_weights_without_scales_are_refused_not_cast(tmp_path):
    """Scaled fp8 values (reaching the fp8 maximum) whose scale is missing: refused. (A plain cast that stays in the
    weights' range loads with scale 1: tests/test_quant_loading.py.)"""
    sd = official_state_dict(diffusers_dit(VARIANTS["t2v"][0]))
    weight = sd["blocks.0.self_attn.q.weight"]
    sd["blocks.0.self_attn.q.weight"] = (weight / weight.abs().amax() * 448).to(torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "fp8.safetensors"))
    with pytest.raises(CheckpointError, match="1 quantized tensor.* without a scale: blocks.0.self_attn.q.weight"):
        load_dit(tmp_path / "fp8.safetensors", dtype=torch.bfloat16)


def test_wrong_inputs_have_clear_errors(tmp_path):
    overrides, model_type, *_ = VARIANTS["i2v"]
    model = load_dit(write_official_dir(tmp_path, official_state_dict(diffusers_dit(overrides)), model_type))
    x, y, context, clip, t = make_inputs(16, 20, 9)
    with pytest.raises(ValueError, match="pass y"):
        model(x, t, context, clip_fea=clip)
    with pytest.raises(ValueError, match="needs clip_fea"):
        model(x, t, context, y=y)


def test_batch_of_one_matches_diffusers(tmp_path):
    """Batch 1 with one timestep takes the fused norm-modulation path."""
    overrides, model_type, x_ch, y_ch, clip_tokens = VARIANTS["i2v"]
    oracle = diffusers_dit(overrides)
    ours = load_dit(write_official_dir(tmp_path, official_state_dict(oracle), model_type))
    x, y, context, clip, t = (v[:1] for v in make_inputs(x_ch, y_ch, clip_tokens))
    expected = diffusers_forward(oracle, x, y, context, clip, t)
    with torch.no_grad():
        assert_close_to_scale(ours(x, t, context, clip_fea=clip, y=y), expected, 1e-4)
