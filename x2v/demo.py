"""A tiny Wan2.1-style model directory with random weights, and a text-to-video run through it.

Everything the demo writes is in the official on-disk layout (sharded DiT safetensors + index + config.json,
umT5 and VAE ``.pth`` files, a ``google/umt5-xxl/`` tokenizer folder), so the demo goes through exactly the
loaders a downloaded model uses. The weights are random: the video is noise, the run proves the plumbing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import x2v
from x2v.loading.weights import build_on_meta
from x2v.models.t5 import T5Encoder, T5EncoderConfig, trim_to_lengths
from x2v.models.vae import Wan21VAE, Wan21VAEConfig
from x2v.models.wan_dit import WanDiT, WanDiTConfig

DEMO_DIT = WanDiTConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64, freq_dim=256)
DEMO_T5 = T5EncoderConfig(vocab=64, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)
DEMO_VAE = Wan21VAEConfig(dim=8, z_dim=16)
DEMO_WORDS = "a cat dog sits runs on the grass in sun rain city night street car red blue green".split()


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for every entry of a (meta) model's state dict; norm gains near 1 keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in model.state_dict().items():
        noise = torch.randn(meta.shape, generator=g)
        is_gain = "norm" in name or name.endswith("gamma")
        out[name] = 1.0 + 0.1 * noise if is_gain else 0.05 * noise
    return out


def write_tokenizer(directory: Path, words: list[str] = DEMO_WORDS) -> None:
    """A word-level tokenizer with T5's special tokens (pad 0, EOS 1, unk 2, then ``words``), saved as a
    HuggingFace tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    wrapped.save_pretrained(str(directory))


def write_demo_model(directory: Path) -> Path:
    """Create the tiny model directory (atomically: built in a temp folder, renamed when complete)."""
    if (directory / "config.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=directory.parent))
    try:
        dit = random_weights(build_on_meta(lambda: WanDiT(DEMO_DIT)), seed=1)
        names = list(dit)
        half = len(names) // 2
        weight_map = {}
        for i, part in enumerate((names[:half], names[half:])):
            shard = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
            save_file({n: dit[n] for n in part}, str(tmp / shard))
            weight_map.update(dict.fromkeys(part, shard))
        (tmp / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum(t.nbytes for t in dit.values())}, "weight_map": weight_map})
        )
        fields = ("model_type", "in_dim", "dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "out_dim",
                  "text_len", "eps")
        config = {"_class_name": "WanModel", **{f: getattr(DEMO_DIT, f) for f in fields}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        t5 = random_weights(build_on_meta(lambda: T5Encoder(DEMO_T5)), seed=2)
        torch.save({k: v.bfloat16() for k, v in t5.items()}, tmp / "models_t5_umt5-xxl-enc-bf16.pth")
        torch.save(random_weights(build_on_meta(lambda: Wan21VAE(DEMO_VAE)), seed=3), tmp / "Wan2.1_VAE.pth")
        write_tokenizer(tmp / "google" / "umt5-xxl")
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Shifted flow-matching noise levels from 1 to 0 (a plain Euler grid; the samplers come with the pipelines)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def run_demo(cache_dir: Path, prompt: str, *, frames: int = 17, height: int = 128, width: int = 128,
             steps: int = 8, guide_scale: float = 5.0, shift: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Text-to-video through the tiny model; returns the video ``[3, frames, H, W]`` in [-1, 1]."""
    timings = {}
    start = time.perf_counter()
    model_dir = write_demo_model(cache_dir / "wan-demo-tiny")
    tokenizer, text_encoder = x2v.load_tokenizer(model_dir), x2v.load_text_encoder(model_dir, dtype=torch.float32)
    dit, vae = x2v.load_dit(model_dir), x2v.load_vae(model_dir)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        ids, mask = tokenizer([prompt, ""])
        cond, uncond = trim_to_lengths(text_encoder(ids, mask), mask)
    timings["text encode"] = time.perf_counter() - start

    start = time.perf_counter()
    latent_shape = (1, vae.z_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
    x = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    sigmas = flow_sigmas(steps, shift)
    with torch.no_grad():
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            t = torch.tensor([sigma * 1000.0])
            v_cond, v_uncond = dit(x, t, [cond]), dit(x, t, [uncond])
            x = x + (next_sigma - sigma).item() * (v_uncond + guide_scale * (v_cond - v_uncond))
    timings["denoise"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(x)[0]
    timings["decode"] = time.perf_counter() - start
    print(f"model: {model_dir} (random weights, official layout)")
    print(f"DiT {dit.config.model_type} dim {dit.config.dim}, {dit.config.num_layers} layers; "
          f"latent {tuple(x.shape[1:])}, {steps} steps with CFG {guide_scale}")
    print(f"video: {tuple(video.shape)} in [{video.min():.2f}, {video.max():.2f}]")
    print("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return video
