"""The demo models: the trained tiny model shipped with x2v (``DEMO_MODEL``, written by tools/train_tiny.py, see
docs/demo-model.md), and tiny model directories with random weights for every model class (the tests' models and
``x2v demo --random-weights``).

Both are in the official on-disk layout (sharded DiT safetensors + index + config.json, umT5 and VAE ``.pth``
files, a ``google/umt5-xxl/`` tokenizer folder), so they go through exactly the loaders and the same pipeline a
downloaded model uses. Random weights make noise and prove the plumbing; the trained model draws the colours its
prompt asks for (not yet its motion: docs/demo-model.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from x2v.loading.weights import build_on_meta
from x2v.models.clip import ClipVisionConfig, ClipVisionTower
from x2v.models.t5 import T5Encoder, T5EncoderConfig
from x2v.models.vae import Wan21VAE, Wan21VAEConfig
from x2v.models.vae22 import Wan22VAE, Wan22VAEConfig
from x2v.models.wan_dit import WanDiT, WanDiTConfig

DEMO_DIT = WanDiTConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64, freq_dim=256)
DEMO_T5 = T5EncoderConfig(vocab=64, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)
DEMO_VAE = Wan21VAEConfig(dim=8, z_dim=16)
DEMO_VAE22 = Wan22VAEConfig(dim=8, decoder_dim=12, z_dim=48)
# The file holds one block more than Wan runs (it uses all but the last), so build a tower one block deeper.
DEMO_CLIP = ClipVisionConfig(image_size=28, patch_size=14, width=64, num_layers=4, num_heads=1, mlp_dim=128)
CLIP_TOKENS = DEMO_CLIP.num_tokens

# kind -> DiT architecture of the tiny model (every released model class has one)
TINY_DITS = {
    "t2v": DEMO_DIT,
    "i2v": replace(DEMO_DIT, model_type="i2v", in_dim=36, image_branch=True, image_dim=DEMO_CLIP.width),
    "flf2v": replace(DEMO_DIT, model_type="flf2v", in_dim=36, image_branch=True, image_dim=DEMO_CLIP.width,
                     image_tokens=2 * CLIP_TOKENS),
    "vace": replace(DEMO_DIT, model_type="vace", vace_layers=(0,)),
    "moe_t2v": DEMO_DIT,
    "moe_i2v": replace(DEMO_DIT, model_type="i2v", in_dim=36),
    "ti2v": replace(DEMO_DIT, model_type="ti2v", in_dim=48, out_dim=48),
}
DEMO_WORDS = "a cat dog sits runs on the grass in sun rain city night street car red blue green".split()

# The trained demo model (package data; written by tools/train_tiny.py)
DEMO_MODEL = Path(__file__).parent / "demo_model"


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for every entry of a (meta) model's state dict; norm gains near 1 keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in model.state_dict().items():
        noise = torch.randn(meta.shape, generator=g)
        is_gain = "norm" in name or name.endswith("gamma")
        out[name] = 1.0 + 0.1 * noise if is_gain else 0.05 * noise
    return out


def write_tokenizer(directory: Path, words: list[str] = DEMO_WORDS, forgiving: bool = False) -> None:
    """A word-level tokenizer with T5's special tokens (pad 0, EOS 1, unk 2, then ``words``), saved as a
    HuggingFace tokenizer folder; ``forgiving``: it lowercases and drops punctuation first ("A red ball." reads
    as "a red ball")."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if forgiving:
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                                   normalizers.Replace(Regex(r"[^\w\s]"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    wrapped.save_pretrained(str(directory))


def write_dit(directory: Path, config: WanDiTConfig, seed: int, sampling: dict | None = None,
              weights: dict[str, torch.Tensor] | None = None) -> None:
    """Official DiT layout: two safetensors shards, their index and config.json (with ``sampling`` keys, as
    LightX2V's distributed models carry them); ``weights`` (a trained state dict) or random ones from ``seed``."""
    directory.mkdir(parents=True, exist_ok=True)
    dit = weights if weights is not None else random_weights(build_on_meta(lambda: WanDiT(config)), seed=seed)
    names = list(dit)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: dit[n] for n in part}, str(directory / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(t.nbytes for t in dit.values())}, "weight_map": weight_map})
    )
    fields = ("model_type", "in_dim", "dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "out_dim",
              "text_len", "eps")
    json_config = {"_class_name": "WanModel", **{f: getattr(config, f) for f in fields}}
    if config.vace_layers:
        json_config.update(_class_name="VaceWanModel", vace_layers=list(config.vace_layers))
    (directory / "config.json").write_text(json.dumps({**json_config, **(sampling or {})}, indent=2))


def write_tiny_model(directory: Path, kind: str = "t2v", sampling: dict | None = None, **dit_changes) -> Path:
    """A complete tiny model directory of ``kind`` (a key of ``TINY_DITS``), random weights, official file names;
    ``sampling``: settings its config.json carries; ``dit_changes``: DiT config fields to change (``num_heads=4``).

    Built in a temp folder and renamed when complete; an existing directory is reused as it is.
    """
    if directory.is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent))
    try:
        config = replace(TINY_DITS[kind], **dit_changes)
        if kind.startswith("moe_"):
            for seed, expert in enumerate(("high_noise_model", "low_noise_model"), start=1):
                write_dit(tmp / expert, config, seed)
        else:
            write_dit(tmp, config, seed=1, sampling=sampling)
        t5 = random_weights(build_on_meta(lambda: T5Encoder(DEMO_T5)), seed=2)
        torch.save({k: v.bfloat16() for k, v in t5.items()}, tmp / "models_t5_umt5-xxl-enc-bf16.pth")
        if kind == "ti2v":
            torch.save(random_weights(build_on_meta(lambda: Wan22VAE(DEMO_VAE22)), seed=3), tmp / "Wan2.2_VAE.pth")
        else:
            torch.save(random_weights(build_on_meta(lambda: Wan21VAE(DEMO_VAE)), seed=3), tmp / "Wan2.1_VAE.pth")
        if config.image_branch:
            deeper = replace(DEMO_CLIP, num_layers=DEMO_CLIP.num_layers + 1)
            clip = random_weights(build_on_meta(lambda: ClipVisionTower(deeper)), seed=4)
            torch.save({f"visual.{k}": v.half() for k, v in clip.items()},
                       tmp / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
        write_tokenizer(tmp / "google" / "umt5-xxl")
        try:
            os.replace(tmp, directory)
        except OSError:
            if not directory.is_dir():
                raise
            # Another process (a torchrun rank) wrote the same model first: use that one.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


# The demo model's own settings, in its config.json (the "model's config.json" level): small enough for a CPU in
# seconds, 17 frames of 128x128, 8 steps. A --config_json or a flag still beats them.
DEMO_SETTINGS = {"target_height": 128, "target_width": 128, "target_video_length": 17, "infer_steps": 8}
DEMO_FOLDER = "wan-demo-tiny-2"  # the name changes when what is written does: a cached older model is not reused


def write_demo_model(cache_dir: Path) -> Path:
    """The demo model (a tiny Wan2.1 T2V with ``DEMO_SETTINGS`` in its config.json) in ``cache_dir``, written once."""
    directory = Path(cache_dir) / DEMO_FOLDER
    if directory.is_dir():
        return directory
    return write_tiny_model(directory, "t2v", sampling=DEMO_SETTINGS)


def word_tokenizer(model: Path):
    """The ``tokenizers`` object of a model folder's ``google/umt5-xxl/tokenizer.json``; None without one."""
    from tokenizers import Tokenizer

    path = Path(model) / "google" / "umt5-xxl" / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def unknown_words(model: Path, prompt: str) -> list[str]:
    """The words of ``prompt`` that a word-level tokenizer (the demo models') reads as unknown; [] for others."""
    tokenizer = word_tokenizer(model)
    if tokenizer is None:
        return []
    unk = tokenizer.token_to_id("<unk>")
    encoding = tokenizer.encode(prompt)
    return [prompt[start:end] for token, (start, end) in zip(encoding.ids, encoding.offsets) if token == unk]


def known_words(model: Path) -> list[str]:
    """The words the demo model's tokenizer knows, in vocabulary order."""
    vocab = word_tokenizer(model).get_vocab()
    return [w for w, _ in sorted(vocab.items(), key=lambda item: item[1]) if not w.startswith("<")]
