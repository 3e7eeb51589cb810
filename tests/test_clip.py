"""CLIP ViT image encoder: tiny random towers compared with transformers' CLIPVisionModel (hidden_states[-2])."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ckpt_utils import assert_close_to_scale, randomize_, write_pth
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from x2v.errors import CheckpointError
from x2v.formats.clip_keys import hf_to_official, infer_architecture, official_to_hf, to_official
from x2v.loading.components import CLIP_FILE as OFFICIAL_FILE
from x2v.loading.load import load_image_encoder
from x2v.loading.weights import build_on_meta
from x2v.models.clip import IMAGE_MEAN, IMAGE_STD, ClipVisionConfig, ClipVisionTower

IMAGE_SIZE, PATCH, WIDTH, LAYERS, HEADS, MLP = 56, 14, 64, 3, 4, 256
FP32_TOL = 1e-5  # same math as transformers, which x2v matches to rounding (observed: exactly equal)


@pytest.fixture(scope="module")
def hf_model() -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="gelu", layer_norm_eps=1e-5,
    )
    # std 0.1 keeps activations large enough that e.g. a tanh GELU would exceed the fp32 tolerance.
    return randomize_(CLIPVisionModel(config), seed=0, std=0.1).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """Not square and not 56x56, so the squash resize matters."""
    return torch.rand(2, 3, 40, 70, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def hf_output(hf_model: CLIPVisionModel, image: torch.Tensor) -> torch.Tensor:
    """Wan's preprocessing done by hand, then the output of all blocks but the last."""
    pixels = F.interpolate(image, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
    pixels = (pixels * 0.5 + 0.5 - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return hf_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


@pytest.fixture(scope="module")
def official_dir(hf_model: CLIPVisionModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding the tiny tower as Wan ships it: full XLM-RoBERTa CLIP state dict, official names."""
    g = torch.Generator().manual_seed(2)
    tensors = hf_to_official(hf_model.state_dict())
    tensors["visual.head"] = torch.randn(WIDTH, 32, generator=g)
    tensors["textual.token_embedding.weight"] = torch.randn(100, 32, generator=g)
    tensors["textual.blocks.0.attn.q.weight"] = torch.randn(32, 32, generator=g)
    tensors["log_scale"] = torch.tensor(4.6)
    model_dir = tmp_path_factory.mktemp("wan_i2v")
    write_pth(model_dir / OFFICIAL_FILE, tensors)
    write_pth(model_dir / "Wan2.1_VAE.pth", {"x": torch.zeros(1)})  # must not be taken for CLIP
    return model_dir


def test_matches_transformers_fp32(official_dir: Path, image: torch.Tensor, hf_output: torch.Tensor) -> None:
    tower = load_image_encoder(official_dir, num_heads=HEADS)
    assert len(tower.transformer) == LAYERS - 1
    assert tower.patch_embedding.weight.dtype == torch.float32
    with torch.no_grad():
        out = tower(image)
    assert out.shape == (2, (IMAGE_SIZE // PATCH) ** 2 + 1, WIDTH)
    assert_close_to_scale(out, hf_output, tol=FP32_TOL)


def test_matches_transformers_bf16(official_dir: Path, image: torch.Tensor, hf_output: torch.Tensor) -> None:
    tower = load_image_encoder(official_dir / OFFICIAL_FILE, dtype=torch.bfloat16, num_heads=HEADS)
    assert tower.transformer[0].attn.to_qkv.weight.dtype == torch.bfloat16
    assert tower.transformer[0].norm1.weight.dtype == torch.float32
    with torch.no_grad():
        out = tower(image)
    assert out.dtype == torch.bfloat16
    assert_close_to_scale(out, hf_output, tol=3e-2)


def test_transformers_named_safetensors(hf_model: CLIPVisionModel, tmp_path: Path, image: torch.Tensor,
                                        hf_output: torch.Tensor) -> None:
    """ComfyUI's clip_vision_h.safetensors: ``vision_model.`` prefix, projection at the root, position_ids."""
    tensors = {"vision_model." + k: v for k, v in hf_model.state_dict().items()}
    tensors["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    tensors["visual_projection.weight"] = torch.randn(32, WIDTH)
    path = tmp_path / "clip_vision_h.safetensors"
    save_file(tensors, str(path))
    tower = load_image_encoder(path, num_heads=HEADS)
    with torch.no_grad():
        assert_close_to_scale(tower(image), hf_output, tol=FP32_TOL)


def test_key_mapping_round_trip(hf_model: CLIPVisionModel) -> None:
    hf = hf_model.state_dict()  # transformers >= 5: no vision_model. prefix
    official = to_official(hf)
    assert official["visual.cls_embedding"].shape == (1, 1, WIDTH)
    assert official["visual.pos_embedding"].shape == (1, 17, WIDTH)
    assert official["visual.transformer.0.attn.to_qkv.weight"].shape == (3 * WIDTH, WIDTH)
    assert to_official({"vision_model." + k: v for k, v in hf.items()}).keys() == official.keys()
    back = official_to_hf(official)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def fake_official_shapes(image_size: int, patch: int, width: int, layers: int, mlp: int) -> dict[str, torch.Tensor]:
    """Meta tensors with the official shapes (reference section 4.2), text tower included."""
    tokens = (image_size // patch) ** 2 + 1
    shapes = {
        "visual.patch_embedding.weight": (width, 3, patch, patch),
        "visual.cls_embedding": (1, 1, width),
        "visual.pos_embedding": (1, tokens, width),
        "visual.pre_norm.weight": (width,),
        "visual.post_norm.weight": (width,),
        "visual.head": (width, 1024),
        "textual.blocks.0.attn.q.weight": (1024, 1024),
        "log_scale": (),
    }
    for n in range(layers):
        shapes[f"visual.transformer.{n}.attn.to_qkv.weight"] = (3 * width, width)
        shapes[f"visual.transformer.{n}.mlp.0.weight"] = (mlp, width)
        shapes[f"visual.transformer.{n}.mlp.2.weight"] = (width, mlp)
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


@pytest.mark.parametrize(
    ("shapes", "num_heads", "expected"),
    [
        ((56, 14, 64, 3, 256), 4, ClipVisionConfig(56, 14, 64, 3, 4, 256)),
        ((32, 8, 160, 2, 320), None, ClipVisionConfig(32, 8, 160, 2, 2, 320)),  # 160 % 80 == 0: head dim 80
        ((224, 14, 1280, 32, 5120), None, ClipVisionConfig()),  # ViT-H/14: 16 heads
        ((224, 14, 1024, 24, 4096), None, ClipVisionConfig(224, 14, 1024, 24, 16, 4096)),  # head dim 64
    ],
)
def test_infer_config(shapes: tuple[int, ...], num_heads: int | None, expected: ClipVisionConfig) -> None:
    assert ClipVisionConfig(**infer_architecture(to_official(fake_official_shapes(*shapes)), num_heads)) == expected


def test_vit_h_parameter_count() -> None:
    """632.1 M visual parameters (reference 4.1) minus the last block, post_norm and head, which are not built."""
    width, mlp, tokens, patch = 1280, 5120, 257, 14
    attn = (width + 1) * 3 * width + (width + 1) * width  # to_qkv, proj (weights and biases)
    block = attn + (width + 1) * mlp + (mlp + 1) * width + 4 * width  # + mlp.0, mlp.2, norm1, norm2
    # patch conv, cls, pos, pre_norm, 32 blocks, post_norm, head
    visual = width * 3 * patch * patch + width + tokens * width + 2 * width + 32 * block + 2 * width + width * 1024
    assert round(visual / 1e6, 1) == 632.1
    dropped = block + 2 * width + width * 1024
    tower = build_on_meta(lambda: ClipVisionTower(ClipVisionConfig()))
    assert sum(p.numel() for p in tower.parameters()) == visual - dropped == 611_086_080


def test_no_clip_checkpoint(tmp_path: Path) -> None:
    write_pth(tmp_path / "Wan2.1_VAE.pth", {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=f"{OFFICIAL_FILE}.*Only Wan2.1 I2V and FLF2V"):
        load_image_encoder(tmp_path)


def test_several_clip_checkpoints(tmp_path: Path) -> None:
    write_pth(tmp_path / "models_clip_a.pth", {"x": torch.zeros(1)})
    (tmp_path / "image_encoder").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "image_encoder" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="models_clip_a.pth, image_encoder/model.safetensors.*clip_original_ckpt"):
        load_image_encoder(tmp_path)


def test_not_a_clip_checkpoint(tmp_path: Path) -> None:
    write_pth(tmp_path / "my_clip.pth", {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="my_clip.pth: not a usable CLIP image encoder.*visual.cls_embedding"):
        load_image_encoder(tmp_path)
