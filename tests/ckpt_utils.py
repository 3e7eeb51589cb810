"""Write tiny checkpoints in the real on-disk formats, and compare outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 2,
                  stem: str = "diffusion_pytorch_model") -> Path:
    """Official layout: ``{stem}-0000i-of-0000N.safetensors`` plus ``{stem}.safetensors.index.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, str(directory / shard))
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = directory / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def write_pth(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter with random values (fresh models zero some weights, e.g. the DiT head).

    Norm gains get 1 + noise so activations keep a sane scale through deep stacks.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_gain = ("norm" in name or "gamma" in name) and name.endswith(("weight", "gamma"))
            p.copy_(1.0 + 0.1 * noise if is_gain else noise * std)
    return module


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max |expected| (error relative to the output's scale)."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3e} > {tol:g} x output scale {scale:.3e}"


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float32."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
