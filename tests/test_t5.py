"""umT5 encoder vs transformers' UMT5EncoderModel on tiny random weights; key maps, loading, tokenizer."""

from __future__ import annotations

import pytest
import torch
from ckpt_utils import assert_close_to_scale, randomize_, write_pth
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

from x2v.demo import write_tokenizer
from x2v.errors import CheckpointError
from x2v.formats.t5_keys import hf_to_official, infer_architecture, official_to_hf, to_official
from x2v.formats.tokenizer import clean_prompt
from x2v.loading.components import COMPONENTS
from x2v.loading.load import load_text_encoder, load_tokenizer
from x2v.loading.weights import build_on_meta
from x2v.models.t5 import UMT5_XXL, T5Encoder, T5EncoderConfig, relative_position_buckets, trim_to_lengths

OFFICIAL_T5_NAME = COMPONENTS["t5"].official_files[0]

# dim == dim_attn, and dim != dim_attn (HF inner_dim = heads * d_kv) with fewer buckets.
TINY_CONFIGS = [
    dict(vocab_size=120, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, relative_attention_num_buckets=32),
    dict(vocab_size=300, d_model=32, d_kv=12, num_heads=4, d_ff=80, num_layers=3, relative_attention_num_buckets=16),
]
LENGTHS = (7, 12)
SEQ_LEN = 16


def tiny_hf_encoder(seed: int = 0, **config) -> UMT5EncoderModel:
    hf_config = UMT5Config(
        feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6, **config,
    )
    model = randomize_(UMT5EncoderModel(hf_config), seed=seed).eval()
    # Large position biases so a wrong bucket or head order cannot hide behind the content logits.
    with torch.no_grad():
        for block in model.encoder.block:
            table = block.layer[0].SelfAttention.relative_attention_bias.weight
            table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model


def padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (len(LENGTHS), SEQ_LEN), generator=g)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        ids[row, length - 1] = 1  # EOS
        ids[row, length:] = 0  # pad
        mask[row, :length] = 1
    return ids, mask


def official_state_dict(hf: UMT5EncoderModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in to_official(hf.state_dict(), "hf model").items()}


def write_official_dir(tmp_path, hf: UMT5EncoderModel, dtype: torch.dtype = torch.float32):
    tensors = {k: v.to(dtype) for k, v in official_state_dict(hf).items()}
    write_pth(tmp_path / "model" / OFFICIAL_T5_NAME, tensors)
    return tmp_path / "model"


@torch.no_grad()
def hf_output(hf: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("config", TINY_CONFIGS)
def test_matches_transformers_fp32(tmp_path, config):
    hf = tiny_hf_encoder(**config)
    model = load_text_encoder(write_official_dir(tmp_path, hf))
    ids, mask = padded_batch(config["vocab_size"])
    with torch.no_grad():
        ours = model(ids, mask)
    assert ours.dtype == torch.float32
    # HF masks the same padded keys, so the padded rows agree too: compare everything.
    assert_close_to_scale(ours, hf_output(hf, ids, mask), tol=1e-4)


def test_bf16_checkpoint_runs_in_bf16(tmp_path):
    config = TINY_CONFIGS[0]
    hf = tiny_hf_encoder(**config)
    model = load_text_encoder(write_official_dir(tmp_path, hf, torch.bfloat16))  # dtype=None: the file's bf16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # norms too, like the official runtime
    ids, mask = padded_batch(config["vocab_size"])
    with torch.no_grad():
        ours = model(ids, mask)
    assert ours.dtype == torch.float32
    assert_close_to_scale(ours, hf_output(hf, ids, mask), tol=3e-2)


def test_dtype_argument_casts_fp32_file(tmp_path):
    hf = tiny_hf_encoder(**TINY_CONFIGS[0])
    model = load_text_encoder(write_official_dir(tmp_path, hf), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("store_tied_copy", [True, False])
def test_hf_named_safetensors_gives_same_output(tmp_path, store_tied_copy):
    config = TINY_CONFIGS[1]
    hf = tiny_hf_encoder(**config)
    hf_tensors = {k: v.clone() for k, v in hf.state_dict().items()}
    if not store_tied_copy:
        del hf_tensors["encoder.embed_tokens.weight"]
    comfy_file = tmp_path / "comfy" / "umt5_xxl_fp32.safetensors"
    comfy_file.parent.mkdir()
    save_file(hf_tensors, str(comfy_file))
    diffusers_file = tmp_path / "diffusers" / "text_encoder" / "model.safetensors"
    diffusers_file.parent.mkdir(parents=True)
    save_file(hf_tensors, str(diffusers_file))
    ids, mask = padded_batch(config["vocab_size"])
    with torch.no_grad():
        from_official = load_text_encoder(write_official_dir(tmp_path, hf))(ids, mask)
        for path in (comfy_file, comfy_file.parent, tmp_path / "diffusers"):
            assert torch.equal(load_text_encoder(path)(ids, mask), from_official), path


def test_key_maps_round_trip():
    hf = tiny_hf_encoder(**TINY_CONFIGS[0])
    hf_tensors = hf.state_dict()
    official = hf_to_official(hf_tensors)
    assert len(official) == 1 + 10 * 2 + 1
    assert "blocks.1.pos_embedding.embedding.weight" in official
    back = official_to_hf(official)
    assert set(back) == set(hf_tensors) - {"encoder.embed_tokens.weight"}
    assert all(back[k] is hf_tensors[k] for k in back)


@pytest.mark.parametrize("config", TINY_CONFIGS)
def test_architecture_inferred_from_shapes(config):
    tensors = official_state_dict(tiny_hf_encoder(**config))
    assert T5EncoderConfig(**infer_architecture(tensors, "test")) == T5EncoderConfig(
        vocab=config["vocab_size"],
        dim=config["d_model"],
        dim_attn=config["d_kv"] * config["num_heads"],
        dim_ffn=config["d_ff"],
        num_heads=config["num_heads"],
        num_layers=config["num_layers"],
        num_buckets=config["relative_attention_num_buckets"],
    )


@pytest.mark.parametrize("num_buckets", [32, 16])
def test_buckets_match_transformers_beyond_max_distance(num_buckets):
    config = dict(TINY_CONFIGS[0], relative_attention_num_buckets=num_buckets)
    attention = tiny_hf_encoder(**config).encoder.block[0].layer[0].SelfAttention
    length = 300
    positions = torch.arange(length)
    expected = attention._relative_position_bucket(positions[None, :] - positions[:, None])
    assert torch.equal(relative_position_buckets(length, num_buckets, 128, torch.device("cpu")), expected)


def test_trim_to_lengths():
    states = torch.randn(2, SEQ_LEN, 4)
    _, mask = padded_batch(100)
    trimmed = trim_to_lengths(states, mask)
    assert [t.shape for t in trimmed] == [(7, 4), (12, 4)]
    assert torch.equal(trimmed[1], states[1, :12])


def test_real_umt5_xxl_size_on_meta():
    model = build_on_meta(lambda: T5Encoder(UMT5_XXL))
    state = model.state_dict()
    assert len(state) == 242
    assert sum(t.numel() for t in state.values()) == 5_680_910_336  # 5.681e9


def test_directory_without_checkpoint_names_config_key(tmp_path):
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="t5_original_ckpt") as info:
        load_text_encoder(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_directory_with_several_checkpoints_lists_them(tmp_path):
    hf = tiny_hf_encoder(**TINY_CONFIGS[0])
    write_pth(tmp_path / "models_t5_umt5-xxl-enc-fp32.pth", official_state_dict(hf))
    write_pth(tmp_path / "text" / "umt5_xxl_fp16.pth", official_state_dict(hf))
    with pytest.raises(CheckpointError, match="t5_original_ckpt") as info:
        load_text_encoder(tmp_path)
    assert "models_t5_umt5-xxl-enc-fp32.pth" in str(info.value) and "umt5_xxl_fp16.pth" in str(info.value)


def test_official_name_wins_over_other_candidates(tmp_path):
    hf = tiny_hf_encoder(**TINY_CONFIGS[0])
    write_official_dir(tmp_path, hf)
    (tmp_path / "model" / "umt5_broken.safetensors").write_bytes(b"not read")
    assert isinstance(load_text_encoder(tmp_path / "model"), T5Encoder)


def test_not_a_t5_file(tmp_path):
    file = write_pth(tmp_path / "umt5_wrong.pth", {"head.modulation": torch.zeros(1, 2, 8)})
    with pytest.raises(CheckpointError, match="not a umT5 text encoder"):
        load_text_encoder(file)


# --- tokenizer ---

def write_tiny_tokenizer(directory) -> None:
    write_tokenizer(directory, words=["a", "&", "b", "c"])  # ids: pad 0, EOS 1, unk 2, a 3, & 4, b 5, c 6


def test_clean_prompt():
    assert clean_prompt("  a&amp;amp;b \n c ") == "a&b c"
    assert clean_prompt("\t\n") == ""


@pytest.mark.parametrize("layout", ["google/umt5-xxl", "tokenizer"])
def test_tokenizer_pads_appends_eos_and_cleans(tmp_path, layout):
    write_tiny_tokenizer(tmp_path / layout)
    tokenizer = load_tokenizer(tmp_path, text_len=8)
    ids, mask = tokenizer(["  a&amp;amp;b \n c ", ""])
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[3, 4, 5, 6, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.sum(dim=1).tolist() == [5, 1]
    single_ids, single_mask = tokenizer("a b c a b c a b c a b c")
    assert single_ids.shape == (1, 8) and single_mask.sum() == 8
    assert single_ids[0, -1] == 1  # truncated, EOS kept


def test_missing_tokenizer_names_config_key(tmp_path):
    with pytest.raises(CheckpointError, match="t5_tokenizer_path") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
