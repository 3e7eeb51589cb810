"""Load the umT5 text encoder and its tokenizer from a Wan model directory or explicit paths."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from x2v.errors import CheckpointError
from x2v.formats.quant import scheme_kind
from x2v.formats.readers import read_checkpoint
from x2v.formats.t5_keys import infer_config, to_official
from x2v.formats.tokenizer import WanTokenizer
from x2v.loading.quantized import prepare_quantized, read_quantization
from x2v.loading.resolve import one_candidate
from x2v.loading.weights import assign_weights, build_on_meta
from x2v.models.t5 import T5Encoder

OFFICIAL_T5_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
# diffusers layout: the encoder is a HF UMT5EncoderModel folder.
DIFFUSERS_T5_FILES = ("text_encoder/model.safetensors.index.json", "text_encoder/model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def files_near(directory: Path) -> list[Path]:
    """Files at the top level of ``directory`` and one folder down."""
    top = sorted(directory.iterdir())
    return [p for p in top if p.is_file()] + [f for d in top if d.is_dir() for f in sorted(d.iterdir()) if f.is_file()]


def looks_like_t5_checkpoint(name: str) -> bool:
    if not name.endswith(CHECKPOINT_SUFFIXES):
        return False
    return (name.startswith("models_t5_") and name.endswith(".pth")) or "umt5" in name.lower()


def find_t5_checkpoint(directory: Path, quant_kind: str | None = None) -> Path:
    """The umT5 checkpoint of a model directory: the official file name first (LightX2V's quantized name when
    ``quant_kind`` is "int8"/"fp8" and that file exists), else the single candidate."""
    files = files_near(directory)
    preferred = [OFFICIAL_T5_NAME.replace("bf16", quant_kind)] if quant_kind else []
    for name in (*preferred, OFFICIAL_T5_NAME):
        official = [f for f in files if f.name == name]
        if official:
            break
    candidates = official or [f for f in files if looks_like_t5_checkpoint(f.name)]
    candidates = candidates or [directory / f for f in DIFFUSERS_T5_FILES if (directory / f).is_file()][:1]
    return one_candidate(directory, candidates, "umT5 text encoder",
                         f"{OFFICIAL_T5_NAME}, models_t5_*.pth and *umt5*.pth/.safetensors at the top level and one "
                         "folder down, and a diffusers text_encoder/ folder", "t5_original_ckpt")


def load_text_encoder(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantized: bool | None = None,
    quant_scheme: str | None = None,
) -> T5Encoder:
    """umT5 encoder from a model directory or a checkpoint file (official or HF/ComfyUI names).

    ``dtype=None`` keeps the checkpoint's dtype (bf16 for the official file). Every weight, norms included,
    is stored in ``dtype``, as in the official bf16 runtime; norms still compute their variance in float32.
    Quantized files (LightX2V ``models_t5_umt5-xxl-enc-{fp8,int8}.pth``, ComfyUI scaled fp8) keep their
    attention and feed-forward linears 8-bit. ``quantized`` / ``quant_scheme`` (``t5_quantized`` /
    ``t5_quant_scheme``) must agree with the file; with a float file they quantize it at load.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: not found. Pass a Wan model directory or the umT5 checkpoint file (config key t5_original_ckpt)."
        )
    file = find_t5_checkpoint(path, scheme_kind(quant_scheme, "t5") if quantized else None) if path.is_dir() else path
    source = str(file)
    tensors = to_official(read_checkpoint(file), source)
    encoding, quantize_kind = read_quantization(tensors, source, "t5", quantized, quant_scheme)
    config = infer_config(tensors, source)
    dtype = dtype or tensors["token_embedding.weight"].dtype
    model = build_on_meta(lambda: T5Encoder(config))
    tensors = prepare_quantized(model, tensors, encoding, quantize_kind=quantize_kind, component="t5", dtype=dtype,
                                device=device)
    return assign_weights(model, tensors, dtype=dtype, device=device, source=source, what="umT5 encoder")


def find_tokenizer_dir(path: Path) -> Path:
    """``google/umt5-xxl/`` (official), ``tokenizer/`` (diffusers), or ``path`` itself if it is a tokenizer folder."""
    for candidate in (path / "google" / "umt5-xxl", path / "tokenizer", path):
        if candidate.is_dir() and any((candidate / f).is_file() for f in TOKENIZER_FILES):
            return candidate
    raise CheckpointError(
        f"{path}: no umT5 tokenizer found (looked for google/umt5-xxl/ and tokenizer/ holding "
        f"{' or '.join(TOKENIZER_FILES)}). Download the google/umt5-xxl tokenizer files into the model directory, "
        "or set the config key t5_tokenizer_path to the tokenizer folder."
    )


def load_tokenizer(path: str | os.PathLike, *, text_len: int = 512) -> WanTokenizer:
    """Tokenizer from a model directory or a tokenizer directory; see ``WanTokenizer`` for what a call returns."""
    from transformers import AutoTokenizer  # the only use of transformers at runtime

    directory = find_tokenizer_dir(Path(path))
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{directory}: cannot load the umT5 tokenizer ({e}). Check that the folder is complete, "
            "or set the config key t5_tokenizer_path to a working tokenizer folder."
        ) from None
    return WanTokenizer(hf_tokenizer, text_len)
