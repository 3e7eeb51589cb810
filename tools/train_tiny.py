"""Train x2v's demo model: a tiny Wan2.1 text-to-video model (VAE and DiT at a small width, umT5 architecture text
encoder kept at its random initialisation) on synthetic clips of one coloured shape moving over a plain background
(tools/scenes.py), written in the official directory layout.

    python tools/train_tiny.py --out x2v/demo_model     # the shipped model (docs/demo-model.md: time, sizes)
    python tools/train_tiny.py --out /tmp/m --quick      # a smoke run of every stage (seconds)

Stages: (1) the VAE learns to reconstruct clips; its latents are then rescaled (folded into its first and last
1x1 convolutions) so that after the official per-channel normalisation they have mean 0 and std 1 per channel;
(2) the clips are encoded and the captions embedded through x2v's own Pipeline (the tokenizer, umT5 and VAE code
that generation uses); (3) the DiT learns the official rectified-flow objective (velocity = noise - latents at
sigma drawn with the sampling shift), with the captions dropped for the default negative prompt 10% of the time
so classifier-free guidance works; its EMA weights are saved; (4) the written model is loaded like a downloaded one
and generates held-out prompts, which are read back (tools/scenes.read_video) and scored.

Everything is seeded: the same command writes the same model on the same machine and torch build.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: tools.scenes, x2v

from tools.scenes import random_scene, read_video, render, vocabulary  # noqa: E402
from x2v.demo import DEMO_T5, random_weights, write_dit, write_tokenizer  # noqa: E402
from x2v.loading.weights import build_on_meta  # noqa: E402
from x2v.models.t5 import T5Encoder, trim_to_lengths  # noqa: E402
from x2v.models.vae import Resample, Wan21VAE, Wan21VAEConfig, streaming  # noqa: E402
from x2v.models.wan_dit import WanDiT, WanDiTConfig  # noqa: E402
from x2v.pipelines.wan import Pipeline  # noqa: E402

FRAMES, SIZE = 17, 64
VAE = Wan21VAEConfig(dim=8, z_dim=16)
DIT = WanDiTConfig(dim=128, ffn_dim=512, num_heads=2, num_layers=4, text_dim=DEMO_T5.dim, freq_dim=256, text_len=32)
# The model's own settings (its config.json): what `x2v demo` runs without flags.
SETTINGS = {"target_height": SIZE, "target_width": SIZE, "target_video_length": FRAMES, "infer_steps": 20,
            "sample_shift": 3.0, "sample_guide_scale": 5.0}
CAPTION_DROP = 0.1
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
LATENT_NOISE = 0.05


@dataclass(frozen=True)
class Plan:
    vae_image_steps: int = 1000  # single frames first (cheap: the spatial layers learn colours and shapes)
    vae_clip_steps: int = 600  # then whole clips: the first frame alone, then chunks carried over, as generated
    vae_image_batch: int = 16
    vae_clip_batch: int = 3
    vae_crop: int = 40  # the convolutions do not care where they are; crops make a step cheaper
    vae_lr: float = 1e-3
    clips: int = 1536
    dit_steps: int = 5000
    dit_batch: int = 32
    dit_lr: float = 5e-4
    ema: float = 0.998
    t5_frozen: float = 0.15  # the last part of the DiT steps, with the text encoder frozen
    eval_prompts: int = 24


QUICK = Plan(vae_image_steps=2, vae_clip_steps=1, vae_image_batch=2, vae_clip_batch=1, vae_crop=16, clips=4,
             dit_steps=2, dit_batch=2, eval_prompts=1)


def log(message: str, start: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)


def to_tensor(videos: np.ndarray) -> torch.Tensor:
    """``[B, F, H, W, 3]`` uint8 -> ``[B, 3, F, H, W]`` float32 in [-1, 1]."""
    return torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1))))


# --- stage 1: the VAE ------------------------------------------------------------------------------------------

def vae_batch(rng: np.random.Generator, batch: int, frames: int, crop: int) -> torch.Tensor:
    clips = []
    for _ in range(batch):
        video = render(random_scene(rng, SIZE, anywhere=True), FRAMES, SIZE)
        t = rng.integers(0, FRAMES - frames + 1)
        y, x = rng.integers(0, SIZE - crop + 1, size=2)
        clips.append(video[t:t + frames, y:y + crop, x:x + crop])
    return to_tensor(np.stack(clips))


@torch.no_grad()
def vae_init(vae: Wan21VAE) -> None:
    """He-initialised convolutions (PyTorch's default scale lets the signal fade through the normalised residual
    stacks, and a tiny VAE then learns too slowly), "inflated" from 2-D: a 3-D kernel starts with weight on the
    current frame only, the temporal downsamplers pick the newest frame and the upsamplers repeat it. So the VAE
    starts as a per-frame image autoencoder, which the cheap single-frame steps train, and the clip steps then
    teach it time."""
    for module in vae.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
            taps = module.weight.shape[2] if module.weight.dim() == 5 else 1
            if taps > 1:
                module.weight[:, :, :-1] = 0
                module.weight[:, :, -1] *= taps**0.5  # He scale of the one tap left
    for module in vae.modules():
        if isinstance(module, Resample) and module.mode.endswith("3d"):
            weight = module.time_conv.weight  # [out, in, 3, 1, 1]
            weight.zero_()
            eye = torch.eye(weight.shape[1]).view(weight.shape[1], weight.shape[1], 1, 1)
            for half in range(weight.shape[0] // weight.shape[1]):  # upsampling: both output frames
                weight[half * weight.shape[1]:(half + 1) * weight.shape[1], :, -1] = eye


def train_vae(plan: Plan, seed: int) -> Wan21VAE:
    """Reconstruction (L1 + L2) of random crops: single frames first, then whole clips."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = Wan21VAE(VAE)
    vae_init(vae)
    optimizer = torch.optim.Adam(vae.parameters(), lr=plan.vae_lr)
    steps = plan.vae_image_steps + plan.vae_clip_steps
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, plan.vae_lr, warmup=50)
        if step < plan.vae_image_steps:
            video = vae_batch(rng, plan.vae_image_batch, 1, plan.vae_crop)
        else:
            video = vae_batch(rng, plan.vae_clip_batch, FRAMES, plan.vae_crop)
        mu = vae.encode_mean(video)
        # A plain autoencoder with a little noise on the latent, so the decoder forgives the DiT small errors
        z = mu + LATENT_NOISE * mu.detach().std() * torch.randn_like(mu)
        x = vae.conv2(z)
        with streaming(vae.decoder):
            decoded = torch.cat([vae.decoder(x[:, :, i:i + 1]) for i in range(x.shape[2])], dim=2)
        error = decoded - video
        loss = error.abs().mean() + error.square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps}: loss {loss.item():.4f} (|error| {error.abs().mean().item():.4f})")
    return vae.eval()


@torch.no_grad()
def fold_latent_scale(vae: Wan21VAE, rng: np.random.Generator) -> None:
    """Rescale the latent per channel, inside the VAE, so that the official normalisation ``(mu - mean) / std``
    gives mean 0 and std 1 on the training clips: ``mu' = mean + std * (mu - m) / s`` (m, s measured) is folded into
    ``conv1`` and undone in ``conv2``, so decoding is unchanged."""
    videos = to_tensor(np.stack([render(random_scene(rng, SIZE, anywhere=True), FRAMES, SIZE) for _ in range(32)]))
    mu = vae.encode_mean(videos)
    m, s = mu.mean(dim=(0, 2, 3, 4)), mu.std(dim=(0, 2, 3, 4))
    mean, std = (t.flatten() for t in vae.latent_mean_std())
    a = std / s
    c = mean - a * m
    z = VAE.z_dim
    vae.conv1.weight[:z] *= a.view(-1, 1, 1, 1, 1)
    vae.conv1.bias[:z] = a * vae.conv1.bias[:z] + c
    vae.conv1.bias[z:] += 2 * a.log()  # the variance scales with a^2
    w2 = vae.conv2.weight.flatten(1)  # [z, z] (1x1x1 kernel)
    vae.conv2.bias -= w2 @ (c / a)
    vae.conv2.weight /= a.view(1, -1, 1, 1, 1)
    error = (vae.decode(vae.encode(videos[:8])) - videos[:8]).abs().mean().item() * 127.5
    log(f"vae: whole clips come back within {error:.1f} levels of 255 on average")


def write_dit_and_t5(directory: Path, dit: WanDiT, t5: dict[str, torch.Tensor]) -> None:
    write_dit(directory, DIT, 0, sampling=SETTINGS,
              weights={k: v.detach().contiguous() for k, v in dit.state_dict().items()})
    torch.save({k: v.bfloat16() for k, v in t5.items()}, directory / T5_FILE)


# --- stage 2: the data, through the pipeline's own encoders ----------------------------------------------------

def dit_init(config: WanDiTConfig, seed: int) -> WanDiT:
    """The official initialisation: xavier-uniform linear layers and patch embedding, N(0, 0.02) text and time
    embeddings, modulation N(0, 1/dim), unit norms, a zero output layer."""
    torch.manual_seed(seed)
    dit = WanDiT(config)
    with torch.no_grad():
        for module in dit.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                torch.nn.init.zeros_(module.bias)
        torch.nn.init.xavier_uniform_(dit.patch_embedding.weight.flatten(1))
        torch.nn.init.zeros_(dit.patch_embedding.bias)
        for embedding in (dit.text_embedding, dit.time_embedding):
            for module in embedding.modules():
                if isinstance(module, torch.nn.Linear):
                    torch.nn.init.normal_(module.weight, std=0.02)
        for name, param in dit.named_parameters():
            if name.endswith("modulation"):
                param.copy_(torch.randn_like(param) / config.dim**0.5)
            elif "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
        torch.nn.init.zeros_(dit.head.head.weight)
    return dit


def write_model(directory: Path, vae: Wan21VAE, dit: WanDiT, seed: int) -> None:
    """The official layout: DiT shards + index + config.json (with ``SETTINGS``), umT5 (bf16, random: it trains
    with the DiT) and VAE ``.pth`` files, the ``google/umt5-xxl/`` tokenizer."""
    write_dit_and_t5(directory, dit, random_weights(build_on_meta(lambda: T5Encoder(DEMO_T5)), seed=seed + 2))
    torch.save(vae.state_dict(), directory / "Wan2.1_VAE.pth")
    write_tokenizer(directory / "google" / "umt5-xxl", vocabulary(), forgiving=True)


@torch.no_grad()
def encode_data(pipe: Pipeline, plan: Plan, rng: np.random.Generator):
    """Latents of ``plan.clips`` scenes, the token ids and masks of every caption with the default negative prompt
    last (what an unconditional pass sees), and each clip's caption index."""
    scenes = [random_scene(rng, SIZE) for _ in range(plan.clips)]
    captions = sorted({s.caption for s in scenes})
    latents = []
    for i in range(0, len(scenes), 32):
        videos = to_tensor(np.stack([render(s, FRAMES, SIZE) for s in scenes[i:i + 32]]))
        latents.append(pipe.vae.encode(videos))
    ids, mask = pipe.tokenizer([*captions, pipe.settings.sampling.negative_prompt])
    index = torch.tensor([captions.index(s.caption) for s in scenes])
    return torch.cat(latents), ids, mask, index


# --- stage 3: the DiT and the text encoder ---------------------------------------------------------------------

def train_dit(dit: WanDiT, t5: torch.nn.Module, data, plan: Plan, shift: float, seed: int) -> WanDiT:
    """The DiT and the umT5 encoder together (a random encoder mixes words too little for the DiT to tell the
    object's colour from the background's); for the last ``plan.t5_frozen`` of the steps the encoder is frozen
    at its bf16 values, the precision its file keeps, so the DiT ends trained on what generation feeds it."""
    latents, ids, mask, index = data
    negative = len(ids) - 1
    torch.manual_seed(seed)
    ema = copy.deepcopy(dit).requires_grad_(False)
    t5.requires_grad_(True)
    params = [*dit.parameters(), *t5.parameters()]
    optimizer = torch.optim.AdamW(params, lr=plan.dit_lr, weight_decay=0.0)
    freeze_at = int(plan.dit_steps * (1 - plan.t5_frozen))
    for step in range(plan.dit_steps):
        if step == freeze_at:
            with torch.no_grad():
                for p in t5.parameters():
                    p.copy_(p.bfloat16().float())
            t5.requires_grad_(False)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, plan.dit_steps, plan.dit_lr)
        pick = torch.randint(0, len(latents), (plan.dit_batch,))
        x0 = latents[pick]
        drop = torch.rand(plan.dit_batch) < CAPTION_DROP
        rows = torch.where(drop, negative, index[pick])
        context = trim_to_lengths(t5(ids[rows], mask[rows]), mask[rows])
        u = torch.rand(plan.dit_batch)
        sigma = shift * u / (1 + (shift - 1) * u)  # the sampler's timestep shift
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        velocity = dit((1 - s) * x0 + s * noise, sigma * 1000, context)
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(plan.ema, (step + 1) / (step + 10))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), dit.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == plan.dit_steps - 1:
            log(f"dit step {step + 1}/{plan.dit_steps}: loss {loss.item():.4f}")
    t5.requires_grad_(False)
    return ema


# --- stage 4: generate and read back ---------------------------------------------------------------------------

def evaluate(model: Path, prompts: int, seed: int) -> float:
    """Generate ``prompts`` scenes (attributes from a seed of their own) with the written model, as a user would,
    and score how many show the asked colour, background and direction."""
    pipe = Pipeline.from_pretrained(model, device="cpu")
    rng = np.random.default_rng(seed + 1000)
    right = 0
    for i in range(prompts):
        s = random_scene(rng, SIZE)
        frames = pipe.generate(s.caption, seed=seed + i, progress=False).frames
        got = read_video(frames)
        ok = (got.colour, got.background, got.direction) == (s.colour, s.background, s.direction)
        right += ok
        log(f"{'ok ' if ok else 'BAD'} {s.caption!r}: read {got.colour} on {got.background}, {got.direction} "
            f"(moved {got.motion[0]:+.0f}, {got.motion[1]:+.0f} px)")
    return right / max(prompts, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write (replaced when complete)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of every stage (tests the script)")
    parser.add_argument("--dit-steps", type=int, help="override the DiT's training steps")
    parser.add_argument("--vae", type=Path, help="a Wan2.1_VAE.pth this script wrote before: train only the DiT")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.dit_steps is not None:
        plan = replace(plan, dit_steps=args.dit_steps)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()

    if args.vae is not None:
        vae = Wan21VAE(VAE)
        vae.load_state_dict(torch.load(args.vae, map_location="cpu", weights_only=True))
        log(f"VAE from {args.vae}")
    else:
        vae = train_vae(plan, args.seed)
        fold_latent_scale(vae, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".train-", dir=args.out.parent))
    try:
        dit = dit_init(DIT, args.seed)
        write_model(work, vae, dit, args.seed)
        pipe = Pipeline.from_pretrained(work, device="cpu")
        data = encode_data(pipe, plan, np.random.default_rng(args.seed + 1))  # the same with --vae
        log(f"encoded {len(data[0])} clips, {len(data[1]) - 1} captions")
        dit = train_dit(dit, pipe.text_encoder, data, plan, SETTINGS["sample_shift"], args.seed)
        write_dit_and_t5(work, dit, pipe.text_encoder.state_dict())
        (work / "training.json").write_text(json.dumps(
            {"command": "python tools/train_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "seed": args.seed, "plan": plan.__dict__, "seconds": round(time.perf_counter() - started),
             "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(work, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"trained in {time.perf_counter() - started:.0f} s; wrote {args.out}")
    score = evaluate(args.out, plan.eval_prompts, args.seed)
    log(f"held-out prompts read back right: {score:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
