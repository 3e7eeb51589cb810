"""Wan2.1 / Wan2.2 VAEs: equivalence with diffusers' AutoencoderKLWan on tiny random weights, key maps,
normalization constants, causality, loading and errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from ckpt_utils import assert_close_to_scale, randomize_, write_pth
from diffusers import AutoencoderKLWan

from x2v.errors import CheckpointError
from x2v.formats.vae_keys import diffusers_to_official, official_to_diffusers
from x2v.loading.components import vae_architecture
from x2v.loading.load import load_vae
from x2v.loading.weights import build_on_meta
from x2v.models.vae import CausalVAE, Wan21VAE, Wan21VAEConfig
from x2v.models.vae22 import WAN22_LATENT_MEAN, WAN22_LATENT_STD, Wan22VAE, Wan22VAEConfig


def wan21_diffusers_config(dim: int, z_dim: int) -> dict:
    # The diffusers defaults are the Wan2.1 release values (incl. latents_mean/std) except for what is passed.
    config = {"base_dim": dim, "z_dim": z_dim}
    if z_dim != 16:
        config |= {"latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim}
    return config


def wan22_diffusers_config(dim: int, decoder_dim: int, z_dim: int) -> dict:
    return {
        "base_dim": dim, "decoder_base_dim": decoder_dim, "z_dim": z_dim, "is_residual": True,
        "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_temporal": 4, "scale_factor_spatial": 16,
        "latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim,
    }


@dataclass
class Case:
    file_name: str
    diffusers_config: dict
    video_shape: tuple[int, ...]
    stride: tuple[int, int, int]


CASES = {
    "wan21": Case("Wan2.1_VAE.pth", wan21_diffusers_config(8, 4), (1, 3, 9, 32, 32), (4, 8, 8)),
    "wan22": Case("Wan2.2_VAE.pth", wan22_diffusers_config(8, 12, 6), (1, 3, 9, 64, 64), (4, 16, 16)),
}


def random_video(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_latents(vae: CausalVAE, video_shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    b, _, t, h, w = video_shape
    st, sh, sw = vae.stride
    shape = (b, vae.z_dim, 1 + (t - 1) // st, h // sh, w // sw)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def tiny_reference(config: dict, seed: int = 0) -> AutoencoderKLWan:
    return randomize_(AutoencoderKLWan(**config), seed=seed).eval()


def write_official(directory: Path, file_name: str, reference: AutoencoderKLWan) -> Path:
    return write_pth(directory / file_name, diffusers_to_official(reference.state_dict()))


@dataclass
class Loaded:
    case: Case
    reference: AutoencoderKLWan
    vae: CausalVAE
    model_dir: Path


@pytest.fixture(scope="module", params=list(CASES))
def loaded(request, tmp_path_factory) -> Loaded:
    case = CASES[request.param]
    reference = tiny_reference(case.diffusers_config)
    model_dir = tmp_path_factory.mktemp(request.param)
    write_official(model_dir, case.file_name, reference)
    return Loaded(case, reference, load_vae(model_dir), model_dir)


def test_encode_and_decode_match_diffusers(loaded: Loaded):
    case, vae = loaded.case, loaded.vae
    assert vae.stride == case.stride and vae.z_dim == case.diffusers_config["z_dim"]
    video = random_video(case.video_shape)
    latents = random_latents(vae, case.video_shape)
    with torch.no_grad():
        expected_mu = loaded.reference.encode(video).latent_dist.mean
        expected_video = loaded.reference.decode(latents).sample  # diffusers clamps to [-1, 1] as well
    # Tiny z_dim: no official statistics, so mean 0 / std 1 and the latents are the raw mu.
    mu = vae.encode(video)
    assert mu.shape == latents.shape == expected_mu.shape
    assert_close_to_scale(mu, expected_mu, tol=1e-4)
    decoded = vae.decode(latents)
    assert decoded.shape == case.video_shape
    assert_close_to_scale(decoded, expected_video, tol=1e-4)


def test_batch_matches_single_samples(loaded: Loaded):
    _, *rest = loaded.case.video_shape
    videos = torch.cat([random_video((1, *rest), seed) for seed in (3, 4)])
    latents = torch.cat([random_latents(loaded.vae, (1, *rest), seed) for seed in (5, 6)])
    encoded, decoded = loaded.vae.encode(videos), loaded.vae.decode(latents)
    for i in range(2):
        assert_close_to_scale(encoded[i:i + 1], loaded.vae.encode(videos[i:i + 1]), tol=1e-5)
        assert_close_to_scale(decoded[i:i + 1], loaded.vae.decode(latents[i:i + 1]), tol=1e-5)


def test_bfloat16_close_to_float32(loaded: Loaded):
    vae_bf16 = load_vae(loaded.model_dir, dtype=torch.bfloat16)
    assert vae_bf16.conv2.weight.dtype == torch.bfloat16
    video = random_video(loaded.case.video_shape)
    latents = random_latents(loaded.vae, loaded.case.video_shape)
    encoded, decoded = vae_bf16.encode(video), vae_bf16.decode(latents)
    assert encoded.dtype == decoded.dtype == torch.bfloat16
    # Random weights through ~30 bf16 convolutions: a few percent, well below any layout error.
    assert_close_to_scale(encoded, loaded.vae.encode(video), tol=0.15)
    assert_close_to_scale(decoded, loaded.vae.decode(latents), tol=0.15)


def test_causality(loaded: Loaded):
    vae = loaded.vae
    video = random_video(loaded.case.video_shape)
    changed_after_0, changed_after_4 = video.clone(), video.clone()
    changed_after_0[:, :, 1:] = random_video(video[:, :, 1:].shape, seed=7)
    changed_after_4[:, :, 5:] = random_video(video[:, :, 5:].shape, seed=8)
    latents = vae.encode(video)
    assert torch.equal(vae.encode(changed_after_0)[:, :, :1], latents[:, :, :1])
    assert torch.equal(vae.encode(changed_after_4)[:, :, :2], latents[:, :, :2])

    decoded = vae.decode(latents)
    changed_latents = latents.clone()
    changed_latents[:, :, 1:] = torch.randn(latents[:, :, 1:].shape)
    assert torch.equal(vae.decode(changed_latents)[:, :, :1], decoded[:, :, :1])
    changed_latents = latents.clone()
    changed_latents[:, :, 2:] = torch.randn(latents[:, :, 2:].shape)
    assert torch.equal(vae.decode(changed_latents)[:, :, :5], decoded[:, :, :5])


def test_frame_count_and_size_are_validated(loaded: Loaded):
    b, c, _, h, w = loaded.case.video_shape
    with pytest.raises(ValueError, match=r"8 frames.*1 \+ 4k.*Trim the video to 5 frames or extend it to 9"):
        loaded.vae.encode(torch.zeros(b, c, 8, h, w))
    with pytest.raises(ValueError, match="multiples of"):
        loaded.vae.encode(torch.zeros(b, c, 1, h + 4, w))
    with pytest.raises(ValueError, match="latents"):
        loaded.vae.decode(torch.zeros(b, loaded.vae.z_dim + 1, 1, 2, 2))


def test_diffusers_folder_and_file_load_the_same_model(loaded: Loaded, tmp_path: Path):
    loaded.reference.save_pretrained(tmp_path / "vae")  # config.json + diffusion_pytorch_model.safetensors
    from_folder = load_vae(tmp_path)
    from_vae_folder = load_vae(tmp_path / "vae")
    from_file = load_vae(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    expected = loaded.vae.state_dict()
    for vae in (from_folder, from_vae_folder, from_file):
        assert type(vae) is type(loaded.vae)
        assert vae.state_dict().keys() == expected.keys()
        assert all(torch.equal(vae.state_dict()[k], v) for k, v in expected.items())
    video = random_video(loaded.case.video_shape)
    assert torch.equal(from_folder.encode(video), loaded.vae.encode(video))


def test_key_maps_round_trip(loaded: Loaded):
    diffusers_state = loaded.reference.state_dict()
    official = diffusers_to_official(diffusers_state)
    assert official.keys() == loaded.vae.state_dict().keys()
    assert official_to_diffusers(official).keys() == diffusers_state.keys()


@pytest.mark.parametrize(
    "version, diffusers_config, params, tensors",
    [
        ("2.1", {}, 126.89e6, 194),
        ("2.2", wan22_diffusers_config(160, 256, 48), 704.69e6, 196),
    ],
)
def test_release_size_models(version, diffusers_config, params, tensors):
    model_class, config = (Wan21VAE, Wan21VAEConfig()) if version == "2.1" else (Wan22VAE, Wan22VAEConfig())
    model = build_on_meta(lambda: model_class(config))
    state = model.state_dict()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == round(params / 1e6, 2)
    assert len(state) == tensors
    assert vae_architecture(state, "meta") == config
    # The key maps at full size against diffusers' own release architecture, names and shapes.
    with torch.device("meta"):
        reference = AutoencoderKLWan(**diffusers_config).state_dict()
    assert {k: v.shape for k, v in official_to_diffusers(state).items()} == {k: v.shape for k, v in reference.items()}
    assert diffusers_to_official(reference).keys() == state.keys()


def test_normalization_uses_official_constants(tmp_path: Path):
    # Wan2.1: the diffusers defaults are the official statistics, an independent copy of ours.
    reference = tiny_reference(wan21_diffusers_config(8, 16))
    write_official(tmp_path / "wan21", "Wan2.1_VAE.pth", reference)
    cases = [(reference, load_vae(tmp_path / "wan21"), reference.config.latents_mean, reference.config.latents_std,
              (1, 3, 5, 16, 16))]
    # Wan2.2: spot values from the reference tables (docs/models.md, Latent normalisation).
    assert len(WAN22_LATENT_MEAN) == len(WAN22_LATENT_STD) == 48
    assert (WAN22_LATENT_MEAN[0], WAN22_LATENT_MEAN[-1], WAN22_LATENT_STD[0], WAN22_LATENT_STD[-1]) == (
        -0.2289, -0.0667, 0.4765, 0.7744)
    reference = tiny_reference(wan22_diffusers_config(8, 8, 48))
    write_official(tmp_path / "wan22", "Wan2.2_VAE.pth", reference)
    cases.append((reference, load_vae(tmp_path / "wan22"), WAN22_LATENT_MEAN, WAN22_LATENT_STD, (1, 3, 5, 32, 32)))

    for reference, vae, mean, std, video_shape in cases:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (mean, std))
        video = random_video(video_shape)
        latents = random_latents(vae, video_shape)
        with torch.no_grad():
            expected_latents = (reference.encode(video).latent_dist.mean - mean) / std
            expected_video = reference.decode(latents * std + mean).sample
        assert_close_to_scale(vae.encode(video), expected_latents, tol=1e-4)
        assert_close_to_scale(vae.decode(latents), expected_video, tol=1e-4)


def test_directory_errors(loaded: Loaded, tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"no VAE found.*Wan2\.1_VAE\.pth.*Wan2\.2_VAE\.pth.*vae_path"):
        load_vae(tmp_path)
    official = (loaded.model_dir / loaded.case.file_name).read_bytes()
    for name in ("Wan2.1_VAE.pth", "Wan2.2_VAE.pth"):
        (tmp_path / name).write_bytes(official)
    with pytest.raises(CheckpointError, match=r"2 VAE checkpoints found \(Wan2\.1_VAE\.pth, Wan2\.2_VAE\.pth\).*vae_path"):
        load_vae(tmp_path)


def test_checkpoint_errors(loaded: Loaded, tmp_path: Path):
    not_a_vae = write_pth(tmp_path / "other.pth", {"blocks.0.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="other.pth: not a Wan VAE"):
        load_vae(not_a_vae)
    state = diffusers_to_official(loaded.reference.state_dict())
    del state["decoder.head.0.gamma"]
    incomplete = write_pth(tmp_path / "incomplete.pth", state)
    with pytest.raises(CheckpointError, match=r"(?s)incomplete.pth.*1 missing tensor\(s\): decoder.head.N.gamma"):
        load_vae(incomplete)
