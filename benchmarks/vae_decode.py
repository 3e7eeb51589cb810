"""Decode a whole video with the Wan VAEs, untiled vs tiled (``use_tiling_vae``): seconds and peak device memory.

    python benchmarks/vae_decode.py                          # Wan2.1 and Wan2.2 VAE, 720P (720x1280), 81 frames
    python benchmarks/vae_decode.py --device meta            # no GPU: the memory the tensors need, counted
    python benchmarks/vae_decode.py --device cpu --tiny --height 64 --width 96 --frames 9   # smoke test

The question it answers: does a 720P decode fit a 24 GB card. The VAE decodes one latent frame at a time (its
causal cache carries the past), so memory does not grow with the length; tiling also splits each frame into
256 px tiles with 64 px overlap. Reported per mode: seconds for the whole video (after a small warm-up decode),
peak memory allocated during the decode above what was there before (weights, latents and the output video
excluded: these are the same for both modes and listed once). Weights are random, scaled so the activations stay
in range (so no figure of how close tiled output is to untiled: with random weights the decoder's global attention
makes every pixel depend on the whole frame; tests/test_vae_tiling.py checks the tiling itself).

``--device meta`` runs the decode on the meta device (shapes only, seconds on a CPU) and counts the bytes of the
tensors alive at each moment: the least any allocator needs. A GPU adds its allocator's rounding and caching and
the convolution kernels' workspaces on top.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref

import torch
from harness import Results, add_json_argument, default_device, gib, make_parser, print_device
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from x2v.errors import first_line
from x2v.loading.weights import build_on_meta
from x2v.models.vae import Wan21VAE, Wan21VAEConfig
from x2v.models.vae22 import Wan22VAE, Wan22VAEConfig

VAES = {"2.1": (Wan21VAE, Wan21VAEConfig(), Wan21VAEConfig(dim=8)),
        "2.2": (Wan22VAE, Wan22VAEConfig(), Wan22VAEConfig(dim=8, decoder_dim=12))}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that operators create while they are alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()  # one Python object per storage while it lives: views share it
                if id(storage) not in self.tracked:
                    self.tracked.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self.release, id(storage), storage.nbytes())
        return out

    def release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.tracked.discard(key)


def random_vae(name: str, tiny: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The VAE built on the meta device and filled on ``device``: He-scaled weights, unit norm gains, zero biases."""
    cls, config, small = VAES[name]
    vae = build_on_meta(lambda: cls(small if tiny else config))
    if device == "meta":
        return vae.to(dtype).eval()
    vae = vae.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for param_name, p in vae.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, math.sqrt(2.0 / p[0].numel()), generator=g)
            else:
                p.fill_(1.0 if param_name.endswith("gamma") else 0.0)
    return vae.to(dtype).eval()


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--vaes", nargs="+", default=list(VAES), choices=list(VAES))
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--modes", nargs="+", default=["untiled", "tiled"], choices=["untiled", "tiled"])
    parser.add_argument("--tiny", action="store_true", help="small channel widths (smoke test of the script)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"],
                        help="the weights' and activations' dtype (default float32: how the pipeline loads the VAE)")
    add_json_argument(parser)
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cuda = args.device.startswith("cuda")
    print_device(args.device)
    if cuda:
        print(f"card memory: {gib(torch.cuda.get_device_properties(0).total_memory):.1f} GiB", flush=True)

    results = Results(args.json)
    for name in args.vaes:
        vae = random_vae(name, args.tiny, dtype, args.device)
        st, sh, sw = vae.stride
        latent_shape = (1, vae.z_dim, 1 + (args.frames - 1) // st, args.height // sh, args.width // sw)
        if args.device == "meta":
            latents = torch.empty(latent_shape, device="meta", dtype=dtype)
        else:
            latents = torch.randn(latent_shape, generator=torch.Generator(args.device).manual_seed(1),
                                  device=args.device, dtype=dtype)
            vae.decode(latents[:, :, :2, :8, :8])  # warm-up: kernels chosen, caches set up
        for mode in args.modes:
            counter = LiveBytes() if args.device == "meta" else contextlib.nullcontext()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            try:
                with counter:
                    video = vae.decode(latents, tiled=mode == "tiled")
                if cuda:
                    torch.cuda.synchronize()
            except torch.OutOfMemoryError as e:
                print(f"Wan{name} VAE {mode}: out of memory ({first_line(e)})", flush=True)
                results.append(dict(vae=name, mode=mode, out_of_memory=True))
                continue
            seconds = time.perf_counter() - start
            result = dict(vae=name, mode=mode, height=args.height, width=args.width, frames=args.frames,
                          latent_shape=latent_shape, seconds=seconds)
            video_bytes = video.numel() * video.element_size()
            if args.device == "meta":
                result.update(peak_gib=gib(counter.peak - video_bytes), video_gib=gib(video_bytes))
            if cuda:
                result.update(peak_gib=gib(torch.cuda.max_memory_allocated() - before - video_bytes),
                              weights_gib=gib(sum(p.numel() * p.element_size() for p in vae.parameters())),
                              video_gib=gib(video_bytes),
                              peak_reserved_gib=gib(torch.cuda.max_memory_reserved()))
            del video
            results.append(result)
            print(f"Wan{name} VAE {mode}: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                if k not in ("vae", "mode")), flush=True)
        del vae, latents
        results.save()  # after each VAE: a run cut short still leaves what it measured


if __name__ == "__main__":
    main()
