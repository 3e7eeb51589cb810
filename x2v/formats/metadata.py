"""What a checkpoint file says about itself beyond its tensors: the Wan2.2 expert names, and the safetensors metadata
``x2v convert`` writes (read back by the resolver, the loaders, ``x2v inspect`` and the pipeline).

The weights alone cannot tell the two Wan2.2 A14B experts apart, so a converted file records its expert; every
converted file also records its layout, encoding, LightX2V scheme, model type and source (docs/convert.md).
"""

from __future__ import annotations

# Wan2.2 A14B: the two experts, in LightX2V order (high noise first); their folder names, lora_configs "name"
# values, and LightX2V's config key prefixes (high_noise_original_ckpt, ...).
EXPERTS = ("high_noise_model", "low_noise_model")
HIGH_NOISE, LOW_NOISE = EXPERTS
EXPERT_SHORT = {"high_noise_model": "high_noise", "low_noise_model": "low_noise"}
EXPERT_METADATA_KEY = "wan_expert"

# What a converted file says about itself (safetensors __metadata__, string values): field -> metadata key.
METADATA_KEYS = {
    "layout": "x2v_layout",
    "encoding": "x2v_encoding",  # float | lightx2v-int8 | lightx2v-fp8 | comfy-scaled-fp8 (x2v.formats.quant)
    "quant_scheme": "quant_scheme",  # the dit_quant_scheme that runs it in LightX2V ("Default": not quantized)
    "model_type": "model_type",  # t2v | i2v | flf2v | vace | ti2v
    "variant": "x2v_variant",  # e.g. "Wan2.1 T2V-1.3B"
    "expert": EXPERT_METADATA_KEY,  # Wan2.2 A14B: high_noise_model | low_noise_model
    "source": "source",  # the path converted
    "loras": "x2v_loras",  # JSON list of the LoRAs merged in
}
# "format": "pt" is the safetensors convention (transformers refuses files whose format is anything else).
FIXED_METADATA = {"format": "pt", "x2v_converter": "x2v convert 1"}


def to_metadata(description: dict[str, str | None]) -> dict[str, str]:
    """``{field: value}`` (fields of ``METADATA_KEYS``; None = unknown, left out) -> safetensors metadata."""
    return {**FIXED_METADATA, **{METADATA_KEYS[f]: v for f, v in description.items() if v is not None}}


def from_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The fields a converted file records, by field name; {} for a file x2v did not write."""
    if "x2v_converter" not in metadata:
        return {}
    return {field: metadata[key] for field, key in METADATA_KEYS.items() if key in metadata}
