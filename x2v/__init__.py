"""x2v: load and run the Wan2.1 / Wan2.2 video diffusion models."""

from x2v.errors import CheckpointError, UnsupportedModelError, X2VError
from x2v.loading.dit import load_dit
from x2v.loading.image_encoder import load_image_encoder
from x2v.loading.text_encoder import load_text_encoder, load_tokenizer
from x2v.loading.vae import load_vae

__all__ = [
    "CheckpointError",
    "UnsupportedModelError",
    "X2VError",
    "load_dit",
    "load_image_encoder",
    "load_text_encoder",
    "load_tokenizer",
    "load_vae",
]
