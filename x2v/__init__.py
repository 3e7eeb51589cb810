"""x2v: load and run the Wan2.1 / Wan2.2 video diffusion models."""

from x2v.errors import CheckpointError, ConfigError, UnsupportedModelError, X2VError

# Public loaders, imported on first use so `import x2v` (and the CLI) starts fast.
_LAZY = {
    "load_dit": "x2v.loading.dit",
    "load_text_encoder": "x2v.loading.load",
    "load_tokenizer": "x2v.loading.load",
    "load_image_encoder": "x2v.loading.load",
    "load_vae": "x2v.loading.load",
    "Pipeline": "x2v.pipelines.wan",
    "resolve_settings": "x2v.pipelines.settings",
    "inspect_model": "x2v.loading.inspect",
    "LoraEntry": "x2v.loading.lora",
    "LoraReport": "x2v.loading.lora",
    "merge_loras": "x2v.loading.lora",
    "attach_loras": "x2v.loading.lora",
    "detach_loras": "x2v.loading.lora",
    "set_lora_strength": "x2v.loading.lora",
}

__all__ = ["CheckpointError", "ConfigError", "UnsupportedModelError", "X2VError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'x2v' has no attribute {name!r}")
