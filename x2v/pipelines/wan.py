"""Text/image-to-video generation with every Wan model class: one pipeline, the model's files decide the path.

``Pipeline.from_pretrained(model_path)`` resolves and loads the components (the model class and task are read
from the weights where the files say them); ``.generate(prompt, ...)`` runs text encoding, image/video
conditioning, the denoising loop (CFG, Wan2.2 experts, TI2V first-frame latent) and the VAE decode.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from x2v.errors import CheckpointError, ConfigError, X2VError, first_line
from x2v.formats import jsonc
from x2v.formats.dit_keys import check_task
from x2v.formats.metadata import HIGH_NOISE as HIGH, LOW_NOISE as LOW
from x2v.loading.components import COMPONENTS
from x2v.loading.dit import finish_dit
from x2v.loading.load import load_component, load_tokenizer, plan
from x2v.loading.lora import (
    LoraEntry, LoraReport, apply_loras, attached_loras, detach_loras, set_lora_strength,
)
from x2v.loading.resolve import model_config_file, resolve_component, resolve_dit
from x2v.models.t5 import trim_to_lengths
from x2v.ops.quant_linear import settle_quant_modes
from x2v.pipelines import conditioning as cond
from x2v.pipelines.schedulers import make_scheduler
from x2v.pipelines.settings import OutputSettings, SamplingSettings, Settings, resolve_settings
from x2v.pipelines.config import model_class
from x2v.pipelines.video import check_output_path, load_image, load_mask, load_video, to_uint8_frames, write_mp4
from x2v.runtime import parallel
from x2v.runtime.offload import DiTOffload, offload_encoders

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    frames: np.ndarray  # [F, H, W, 3] uint8
    fps: int
    video: torch.Tensor  # [3, F, H, W] in [-1, 1]
    seed: int
    path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0

    def report(self) -> str:
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())
        saved = f" -> {self.path}" if self.path else ""
        return (f"{self.frames.shape[0]} frames {self.frames.shape[2]}x{self.frames.shape[1]} at {self.fps} fps, "
                f"seed {self.seed}{saved}\ntime: {phases}\npeak memory: {self.peak_memory_bytes / 2**30:.2f} GiB")


def compile_blocks(dit: torch.nn.Module, device: torch.device | str) -> None:
    """``use_compile``: each transformer block's forward compiled (once per input shape; all blocks share the
    code) for running on ``device``. LoRA strengths are tensors, so changing one does not recompile."""
    import torch._dynamo

    settle_quant_modes(dit, device)

    # Dynamic LoRA branches are forward hooks: by default dynamo does not guard on hooks, so a block without a
    # branch could run the graph of one with it (wrong output, no error). Guard on them.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    for block in [*dit.blocks, *getattr(dit, "vace_blocks", [])]:
        block.compile()


def model_class_of(architectures: list, distilled: bool) -> str:
    """LightX2V's ``model_cls`` for DiT weights of these architectures (one, or Wan2.2's two experts);
    ``distilled``: a settings level names a denoising_step_list (LightX2V's 4-step models)."""
    if len(architectures) == 2:
        return "wan2.2_moe_distill" if distilled else "wan2.2_moe"
    model_type = architectures[0].model_type
    if model_type == "ti2v":
        return "wan2.2"
    if model_type == "vace":
        return "wan2.1_vace"
    return "wan2.1_distill" if distilled else "wan2.1"


def default_task(architecture) -> str:
    return {"i2v": "i2v", "flf2v": "flf2v", "vace": "vace"}.get(architecture.model_type, "t2v")


@contextmanager
def timed(timings: dict, phase: str, device: torch.device):
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else CUDA when there is one (under torchrun: each rank's GPU, see ``x2v.runtime.parallel``)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# What makes a DiT's output NaN or constant (black videos).
NON_FINITE_CAUSES = ("weights or a LoRA with extreme values (x2v inspect the model), a LoRA strength far above 1, "
                     "float16 overflow (use bf16), or a sampler setting far outside the model's range")


def memory_of(device: torch.device) -> int:
    """The device's memory in bytes (the host's RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host RSS, kB on Linux


class Pipeline:
    def __init__(self, *, settings: Settings, components: dict, device: torch.device, dtype: torch.dtype,
                 load_seconds: float = 0.0, layout: parallel.Layout | None = None):
        self.settings, self.layout = settings, layout
        self.main = layout is None or layout.main  # runs the encoders and writes the video
        self.model_cls, self.task = settings.model_cls, settings.task
        self.tokenizer, self.text_encoder = components.get("tokenizer"), components.get("t5")
        self.dits, self.vae, self.clip = components["dits"], components.get("vae"), components.get("clip")
        self.device, self.dtype, self.load_seconds = device, dtype, load_seconds
        self.offload = DiTOffload(self.dits, device, settings.offload)

    @classmethod
    def from_pretrained(cls, model_path: str | Path | None = None, model_cls: str | None = None,
                        task: str | None = None, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, config_json: str | Path | dict | None = None,
                        **config) -> Pipeline:
        """Load every component of ``model_path``. ``config_json`` (a LightX2V-style file or dict) and keyword
        settings (LightX2V key names, e.g. ``infer_steps=4``, ``dit_quant_scheme="fp8-vllm"``) override the
        defaults, keywords last (docs/config.md). Under torchrun, ``parallel={"seq_p_size": ...}`` splits the work
        over the ranks (README, Many GPUs)."""
        keywords = {**config, "model_path": model_path, "model_cls": model_cls, "task": task}
        return cls.load(resolve_settings(config_json=config_json, keywords=keywords), device=device, dtype=dtype)

    @classmethod
    def load(cls, settings: Settings, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             layout: parallel.Layout | None = None) -> Pipeline:
        """Load the model ``settings`` (from ``resolve_settings``) describe. The DiT files' headers say what the
        model is; the settings are completed for it and checked before any weight is read. Under torchrun the job
        is joined first (``layout``: already joined, by ``parallel.start``)."""
        start = time.perf_counter()
        device = default_device(device)
        if layout is None:
            layout = parallel.start(settings.parallel, device)
            if layout is not None and layout.main:
                log.info(layout.describe())
        device = layout.device if layout is not None else device
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        sources, model_path = settings.sources, settings.model_path
        if model_path is None and not sources.files:
            raise ConfigError("model_path is not set: pass the model folder or a DiT file (--model_path, "
                              "model_path=, or the config key), or name the files with dit_original_ckpt & co.")
        found = resolve_dit(model_path or "", sources)
        plans = {name: plan(COMPONENTS["dit"], f.path, sources.quant("dit")) for name, f in found.items()}
        main = next(iter(plans.values()))
        config_file = model_config_file(model_path, found)
        model_config = jsonc.load(config_file) if config_file else {}
        if not isinstance(model_config, dict):
            raise CheckpointError(f"{config_file}: a model's config.json holds one JSON object, got "
                                  f"{type(model_config).__name__}; use the one that came with the weights, or remove it")
        distilled = bool(settings.get("denoising_step_list") or model_config.get("denoising_step_list"))
        model_cls = settings.model_cls or model_class_of([p.architecture for p in plans.values()], distilled)
        task = settings.task or default_task(main.architecture)
        check_task(main.architecture, task, main.source)
        parallel.check_heads(settings.parallel, main.architecture.num_heads, str(main.source))
        settings = settings.for_model(model_cls, task, model_config, config_file)
        for warning in settings.warnings:
            log.warning(warning)

        offload, lora = settings.offload, settings.lora
        # Experts wait on the CPU; only the active one is moved to the GPU during sampling. Sharded weights (fsdp)
        # go to the GPU block by block, a 1/world part each.
        fsdp = settings.parallel.fsdp and layout is not None
        dit_device = "cpu" if len(found) == 2 or fsdp else offload.place("dit", device)
        dits = {name: finish_dit(planned, dtype=dtype, device=dit_device, expert=name if len(plans) == 2 else None,
                                 lora_configs=lora.entries, lora_dynamic_apply=lora.dynamic, lora_strict=lora.strict)
                for name, planned in plans.items()}
        for dit in dits.values():
            if layout is not None:
                layout.parallelize(dit)
            dit.set_attention(*settings.attention.types)
            if settings.attention.compile:
                compile_blocks(dit, device)

        def locate(name: str) -> Path:
            return resolve_component(name, model_path or main.checkpoint, sources).path

        def load(name: str) -> torch.nn.Module:
            return load_component(name, locate(name), dtype=None if name == "vae" else dtype,
                                  device=offload.place(name, device), quantization=sources.quant(name))

        components = {"dits": dits}
        # The encoders run on rank 0 only (one umT5-XXL per job); the VAE decodes on every rank with vae_parallel.
        if layout is None or layout.main:
            components.update(tokenizer=load_tokenizer(locate("tokenizer"), text_len=main.architecture.text_len),
                              t5=load("t5"), vae=load("vae"))
            if main.architecture.image_branch:
                components["clip"] = load("clip")
            offload_encoders(components, device, offload)
        elif settings.parallel.vae_parallel:
            components["vae"] = load("vae")
            offload_encoders(components, device, offload)
        return cls(settings=settings, components=components, device=device, dtype=dtype,
                   load_seconds=time.perf_counter() - start, layout=layout)

    # --- LoRAs ------------------------------------------------------------------------------------------------

    def load_lora(self, path: str | Path, strength: float = 1.0, alpha: float | None = None,
                  name: str | None = None) -> LoraReport:
        """Attach a LoRA at run time, on top of any already attached; ``unload_loras`` removes them without
        reloading. A Wan2.2 two-expert model needs ``name``: the expert it is for (call once per expert)."""
        entry = LoraEntry.from_config({"path": str(path), "strength": strength, "alpha": alpha, "name": name})
        reports = []
        for expert, dit in self.dits.items():
            reports += apply_loras(dit, [entry], dynamic=True, strict=self.settings.lora.strict,
                                   expert=expert if len(self.dits) == 2 else None)
        return reports[0]

    def set_lora_strength(self, path: str | Path, strength: float, name: str | None = None) -> None:
        """Change the strength of a LoRA attached at run time (``load_lora``, or ``lora_configs`` with
        ``lora_dynamic_apply``), on every expert that has it or on expert ``name``; no reload, no recompile."""
        dits = [dit for expert, dit in self.dits.items() if name in (None, expert)
                and any(r.path == str(path) for r in attached_loras(dit))]
        if not dits:
            raise ValueError(f"{path}: no LoRA attached at run time under this path"
                             + (f" on {name}" if name else "") + "; load it with load_lora first")
        for dit in dits:
            set_lora_strength(dit, path, strength)

    def unload_loras(self) -> None:
        """Remove every LoRA attached at run time (``load_lora``, or ``lora_configs`` with ``lora_dynamic_apply``):
        the weights are the base model's again, bit for bit. LoRAs merged at load stay until the model is reloaded."""
        for dit in self.dits.values():
            detach_loras(dit)
        if self.settings.lora.entries and not self.settings.lora.dynamic:
            log.warning("the lora_configs LoRAs were merged into the weights at load and stay; reload the pipeline "
                        "without them, or set lora_dynamic_apply true to be able to remove them.")

    # --- generation -------------------------------------------------------------------------------------------

    def generate(self, prompt: str | list[str] | None = None, *, negative_prompt: str | None = None, image=None,
                 last_image=None, src_video=None, src_mask=None, src_ref_images=None, seed: int | list[int] | None = None,
                 save_result_path: str | Path | list | None = None, progress: bool = True,
                 on_progress: ProgressCallback | None = None, **overrides) -> GenerationResult | list[GenerationResult]:
        """One video. ``image`` / ``last_image``: path, PIL image, uint8 array or [3, H, W] tensor in [-1, 1];
        ``src_video`` / ``src_mask`` (VACE): mp4 paths or tensors ``[3, F, H, W]`` / ``[F, H, W]`` (1 = generate);
        ``src_ref_images`` (VACE): a list of images the video should contain. Inputs left out come from the settings
        (``prompt``, ``image_path``, ``last_frame_path``, ``src_video``, ...), as LightX2V's command line gives them.
        ``overrides`` are per-request settings (``infer_steps``, ``target_video_length`` / ``num_frames``,
        ``sample_guide_scale``...), checked as a config file's are. Same seed and inputs give the same video.

        ``prompt`` a list: one video per prompt, denoised as one batch, returned as a list; ``seed`` and
        ``save_result_path`` are then lists of the same length (one seed is used for every prompt). Each video is
        the one a single call with its prompt and seed makes. ``on_progress(phase, step, steps)`` is called as the
        work goes on (phases: encode, denoise, decode, which includes writing the mp4); returning True stops at the
        next step (``Cancelled``)."""
        batch = isinstance(prompt, (list, tuple))
        prompts = list(prompt) if batch else [prompt]
        seeds, paths = (per_prompt(value, len(prompts), name) for value, name in
                        ((seed, "seed"), (save_result_path, "save_result_path")))
        shared = {"negative_prompt": negative_prompt, "image": image, "last_image": last_image, "src_video": src_video,
                  "src_mask": src_mask, "src_ref_images": src_ref_images, **overrides}
        requests = [{**shared, "prompt": p, "seed": s, "save_result_path": path}
                    for p, s, path in zip(prompts, seeds, paths)]
        results = self.generate_batch(requests, progress=progress, on_progress=on_progress)
        return results if batch else results[0]

    def generate_batch(self, requests: list[Mapping[str, Any]], *, progress: bool = True,
                       on_progress: ProgressCallback | None = None) -> list[GenerationResult]:
        """One video per request (a mapping of ``generate``'s keywords: ``prompt``, ``seed``, ``image``, settings
        such as ``infer_steps``...). Requests with the same latent shape and sampling schedule are denoised
        together, each with its own prompt, seed, guidance and inputs; the results are those of single calls."""
        if not requests:
            return []
        report = on_progress or (lambda phase, step, steps: False)
        prepared = [self.prepare_request(request) for request in requests]
        paths = [item.settings.output.save_path for item in prepared if item.settings.output.save_path]
        shared = next((path for path in paths if paths.count(path) > 1), None)
        if shared is not None:
            raise ConfigError(f"several videos of one call would be written to {shared}: give each prompt its own "
                              "save_result_path (a list, one per prompt)")
        timings = {"load": self.load_seconds} if self.load_seconds else {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            encoded = []
            for i, item in enumerate(prepared):
                # Rank 0 encodes the prompts and inputs and draws the noise; every rank then starts from the same.
                if self.main:
                    report("encode", i, len(prepared))
                inputs = self.encode_or_share(item, timings)
                encoded.append(inputs)
            groups: dict[tuple, list[int]] = {}
            for i, (item, inputs) in enumerate(zip(prepared, encoded)):
                groups.setdefault(batch_signature(item.settings.sampling, inputs), []).append(i)
            latents: dict[int, torch.Tensor] = {}
            total = sum(prepared[members[0]].settings.sampling.steps for members in groups.values())
            done = 0
            for members in groups.values():
                stop = self.stop_check(report, done, total)
                with timed(timings, "denoise", self.device), self.offload.denoising():
                    out = self.denoise([prepared[i].settings.sampling for i in members],
                                       stack_inputs([encoded[i] for i in members]), progress, stop)
                latents.update(zip(members, out.unbind(0)))
                done += prepared[members[0]].settings.sampling.steps
            results = []
            for i, item in enumerate(prepared):  # one video at a time on the device
                report("decode", i, len(prepared))
                results.append(self.finish(item, latents.pop(i), encoded[i], timings))
        return results

    def finish(self, item: Prepared, latents: torch.Tensor, inputs: dict, timings: dict) -> GenerationResult:
        """Decode one request's latents, check the video and write its mp4 (rank 0)."""
        if not torch.isfinite(latents).all():
            raise X2VError(f"the denoised latents hold NaN or infinite values, so the video would be black; "
                           f"nothing was written. Usual causes: {NON_FINITE_CAUSES}")
        output = item.settings.output
        with timed(timings, "decode", self.device):
            # VACE reference images are extra latent frames in front; they are not part of the video.
            video = self.decode(latents[None, :, inputs.get("ref_frames", 0):].float(), output.tiled_vae)
        if video.amin() == video.amax():
            raise X2VError(f"every pixel of the video came out {float(video.amin()):+.3f} (a constant video); "
                           f"nothing was written. Usual causes: {NON_FINITE_CAUSES}")
        video = video.cpu()
        result = GenerationResult(to_uint8_frames(video), output.fps, video, inputs["seed"], timings=dict(timings),
                                  peak_memory_bytes=peak_memory(self.device))
        if output.save_path and self.main:
            with timed(result.timings, "save", self.device):
                result.path = write_mp4(result.frames, output.save_path, result.fps)
        return result

    def prepare_request(self, request: Mapping[str, Any]) -> Prepared:
        """A request's settings and inputs, checked before any compute: prompt, memory, output path."""
        s = self.settings.for_request({key: v for key, v in request.items() if key not in INPUT_KEYWORDS})
        inputs = {key: s.get(setting) if request.get(key) is None else request[key]
                  for key, setting in INPUT_KEYWORDS.items()}
        for warning in s.warnings:
            log.warning(warning)
        prompt = s.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("no prompt: say what the video shows (--prompt \"...\", generate(\"...\") or the "
                              "config key prompt)")
        output = s.output
        self.check_fits(output)
        if output.save_path and self.main:  # before the compute, not after it
            check_output_path(output.save_path, output.frames, output.height, output.width)
        refs = inputs["src_ref_images"]
        if isinstance(refs, str):  # LightX2V's flag: comma-separated paths
            refs = [path for path in refs.split(",") if path]
        return Prepared(s, prompt, (inputs["image"], inputs["last_image"]),
                        (inputs["src_video"], inputs["src_mask"], refs or []))

    def encode_or_share(self, item: Prepared, timings: dict) -> dict:
        """``encode_inputs`` on rank 0, shared with every rank; a failure there (a bad image...) is raised on every
        rank, so that none waits for inputs that will not come."""
        inputs = None
        if self.main:
            try:
                inputs = self.encode_inputs(item, timings)
            except Exception as error:
                if self.layout is not None:
                    self.layout.share({"failed": first_line(error)})
                raise
        if self.layout is None:
            return inputs
        with timed(timings, "share inputs", self.device):
            inputs = self.layout.share(inputs)
        if "failed" in inputs:
            raise X2VError(f"rank 0 could not encode the inputs: {inputs['failed']}")
        return inputs

    def stop_check(self, report: ProgressCallback, done: int, total: int) -> Callable[[int], None]:
        """``stop(step)`` for the denoising loop: reports progress and raises ``Cancelled`` on every rank when the
        callback (rank 0's) asks to stop."""
        def stop(step: int) -> None:
            wanted = bool(report("denoise", done + step, total)) if self.main else False
            if self.layout is not None:
                wanted = self.layout.share({"stop": wanted} if self.main else None)["stop"]
            if wanted:
                raise Cancelled("stopped on request")
        return stop

    def check_fits(self, output: OutputSettings) -> None:
        """Refuse a size whose activations alone exceed the device's memory, before allocating any of it."""
        dit = next(iter(self.dits.values())).config
        multiple = model_class(self.model_cls).size_multiple
        tokens = ((output.frames - 1) // 4 + 1) * (output.height // multiple) * (output.width // multiple)
        if self.layout is not None:
            tokens = -(-tokens // self.layout.config.seq_size)
        needed = tokens * (3 * dit.dim * 4 + dit.ffn_dim * 2) + 3 * output.frames * output.height * output.width * 4
        total = memory_of(self.device)
        if needed > total:
            raise ConfigError(f"{output.width}x{output.height}, {output.frames} frames needs at least "
                              f"{needed / 2**30:.1f} GiB for the activations alone; the {self.device.type} has "
                              f"{total / 2**30:.1f} GiB. Lower target_height / target_width / target_video_length "
                              "(or split the tokens over more GPUs: README, Many GPUs)")

    def encode_inputs(self, item: Prepared, timings: dict) -> dict:
        """What the denoising loop starts from: the umT5 states of the prompt (``cond``) and of the negative prompt
        (``uncond``, with CFG), the DiT's conditioning (``prepare_inputs``), the seed and the initial ``noise``."""
        sampling, output = item.settings.sampling, item.settings.output
        with timed(timings, "text encode", self.device):
            prompts = [item.prompt] + ([sampling.negative_prompt] if sampling.cfg else [])
            ids, mask = self.tokenizer(prompts)
            contexts = trim_to_lengths(self.text_encoder(ids.to(self.device), mask.to(self.device)), mask)
        inputs = self.prepare_inputs(output, *item.images, item.vace_sources, timings)
        seed = sampling.seed if sampling.seed >= 0 else int(torch.randint(0, 2**31 - 1, ()).item())
        noise_device = self.device if sampling.noise_device == "device" else torch.device(sampling.noise_device)
        generator = torch.Generator(noise_device).manual_seed(seed)
        noise = torch.randn(inputs["shape"], generator=generator, device=noise_device).to(self.device)
        return {**dict(zip(("cond", "uncond"), contexts)), **inputs, "seed": seed, "noise": noise}

    def decode(self, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
        """The video ``[3, F, H, W]`` of ``latents``, on every rank: decoded here, on rank 0 and shared, or (with
        ``vae_parallel``) as tiles spread over the ranks and summed."""
        layout = self.layout
        if layout is None:
            return self.vae.decode(latents, tiled=tiled)[0]
        if layout.config.vae_parallel:
            part = (layout.rank, layout.config.world_size)
            return layout.sum(self.vae.decode(latents, tiled=True, part=part))[0]
        return layout.share({"video": self.vae.decode(latents, tiled=tiled)[0]} if layout.main else None)["video"]

    def encode(self, video: torch.Tensor, tiled: bool) -> torch.Tensor:
        """VAE latents of ``video`` [B, 3, F, H, W] (``tiled``: the request's ``use_tiling_vae``)."""
        return self.vae.encode(video.to(self.device), tiled=tiled)

    def prepare_inputs(self, output: OutputSettings, image, last_image, vace_sources, timings) -> dict:
        """Latent shape and the conditioning the DiT takes (``y``, ``clip_fea``, ``vace_context``, TI2V image)."""
        stride_t, stride_h, stride_w = self.vae.stride
        frames, height, width, tiled = output.frames, output.height, output.width, output.tiled_vae
        inputs: dict = {}
        if self.task in ("i2v", "flf2v"):
            if image is None:
                raise ValueError(f"task {self.task} needs an image (image= / --image_path)")
            if self.task == "flf2v" and last_image is None:
                raise ValueError("task flf2v needs a last frame (last_image= / --last_frame_path)")
            with timed(timings, "image encode", self.device):
                height, width = self.image_conditioning(inputs, frames, height * width, image, last_image, tiled)
        elif self.task == "vace":
            with timed(timings, "video encode", self.device):
                inputs.update(self.vace_inputs(frames, height, width, *vace_sources, tiled))
        latent_frames = (frames - 1) // stride_t + 1 + inputs.get("ref_frames", 0)
        inputs["shape"] = (1, self.vae.z_dim, latent_frames, height // stride_h, width // stride_w)
        return inputs

    def image_conditioning(self, inputs: dict, frames: int, area: int, image, last_image, tiled: bool
                           ) -> tuple[int, int]:
        """Fill ``inputs`` from the first (and last) frame; returns the output (height, width) they imply."""
        first = load_image(image)
        if self.model_cls == "wan2.2":  # TI2V-5B: the image becomes latent frame 0
            width, height = cond.ti2v_size(first.shape[2], first.shape[1], area)
            picture = cond.resize_cover_crop(first, height, width)
            inputs["first_latent"] = self.encode(picture[None, :, None], tiled)
            return height, width
        # Wan2.1 I2V / FLF2V, Wan2.2 I2V-A14B: mask + conditioning latent on the channels, CLIP tokens (Wan2.1)
        stride = self.vae.stride[1]
        last = load_image(last_image) if last_image is not None else None
        height, width = cond.i2v_size(first.shape[1], first.shape[2], area, stride)
        latent = self.encode(cond.conditioning_video(first, frames, height, width, last)[None], tiled)
        mask = cond.i2v_mask(frames, height // stride, width // stride, last is not None)
        inputs["y"] = torch.cat([mask[None].to(self.device), latent], dim=1)
        if self.clip is not None:
            pictures = [first] + ([last] if last is not None else [])
            inputs["clip_fea"] = torch.cat([self.clip(p[None].to(self.device)) for p in pictures], dim=1)
        return height, width

    def vace_inputs(self, frames, height, width, src_video, src_mask, ref_images, tiled: bool) -> dict:
        """VACE context: [VAE(video*(1-mask)) 16, VAE(video*mask) 16, folded mask 64]. Without a source video
        everything is generated (grey video, all-ones mask). Reference images go in front as extra latent
        frames: [VAE(image), zeros] with a zero mask."""
        video = torch.zeros(3, frames, height, width) if src_video is None else load_video(src_video)
        mask = torch.ones(frames, height, width) if src_mask is None else load_mask(src_mask)
        if video.shape[1:] != (frames, height, width) or mask.shape != (frames, height, width):
            raise ValueError(f"VACE src_video must be [3, {frames}, {height}, {width}] and src_mask "
                             f"[{frames}, {height}, {width}], got {list(video.shape)} and {list(mask.shape)}")
        inactive = self.encode((video * (1 - mask))[None], tiled)
        reactive = self.encode((video * mask)[None], tiled)
        context = torch.cat([inactive, reactive, cond.fold_vace_mask(mask, inactive.shape[2], self.vae.stride[1])[None]
                             .to(self.device)], dim=1)
        refs = []
        for ref in ref_images:
            picture = cond.fit_on_white(load_image(ref), height, width)
            latent = self.encode(picture[None, :, None], tiled)
            refs.append(torch.cat([latent, torch.zeros_like(latent), context.new_zeros(1, 64, *latent.shape[2:])], 1))
        return {"vace_context": torch.cat([*refs, context], dim=2), "ref_frames": len(refs)}

    def expert_for(self, sampling: SamplingSettings, step: int, t: torch.Tensor) -> str:
        """Wan2.2 A14B: high-noise expert while t >= boundary * 1000 (distilled: for the first steps)."""
        if len(self.dits) == 1:
            return next(iter(self.dits))
        if sampling.boundary_step is not None:
            return HIGH if step < sampling.boundary_step else LOW
        return HIGH if float(t) >= sampling.boundary * 1000 else LOW

    def activate(self, name: str) -> torch.nn.Module:
        """Move the chosen expert to the compute device and the other one off it (with cpu_offload: as
        ``offload_granularity`` says)."""
        if self.offload.enabled:
            return self.offload.activate(name)
        if self.settings.parallel.fsdp and self.layout is not None:
            return self.dits[name]  # every expert's shards stay on the GPU
        for other, model in self.dits.items():
            if other != name and self.device.type != "cpu":
                model.to("cpu")
        return self.dits[name].to(self.device)

    def denoise(self, samplings: list[SamplingSettings], batch: dict, progress: bool,
                stop: Callable[[int], None] | None = None) -> torch.Tensor:
        """Latents ``[B, ...]`` from ``batch`` (``stack_inputs``: the initial noise, contexts and conditioning of
        B requests that share one schedule, ``samplings`` theirs). ``stop(step)`` runs before every step."""
        s = samplings[0]
        steps = list(s.denoising_steps) if s.denoising_steps else None
        scheduler = make_scheduler(s.solver, None if steps else s.steps, s.shift, denoising_step_list=steps)
        x, contexts = batch["noise"], batch["contexts"]
        scales = {expert: torch.tensor([p.guide_scales[expert] for p in samplings], device=self.device)
                  .view(-1, 1, 1, 1, 1) for expert in ("high", "low")}
        first_latent = batch.get("first_latent")
        if first_latent is not None:
            keep = torch.ones_like(x)
            keep[:, :, 0] = 0  # TI2V: latent frame 0 is the image, kept fixed
            x = (1 - keep) * first_latent + keep * x
        extra = {k: batch[k] for k in ("y", "clip_fea", "vace_context") if k in batch}
        steps = list(enumerate(scheduler.timesteps))
        if progress and self.main:
            from tqdm import tqdm

            steps = tqdm(steps, desc="denoise", unit="step")
        active = None
        for i, t in steps:
            if stop is not None:
                stop(i)
            name = self.expert_for(s, i, t)
            if name != active:
                dit, active = self.activate(name), name
            if i + 1 < len(scheduler.timesteps):  # model offload: the next expert is copied during this step
                self.offload.prefetch(self.expert_for(s, i + 1, scheduler.timesteps[i + 1]))
            timestep = t.reshape(1).to(self.device)
            if first_latent is not None:
                timestep = cond.per_token_timesteps(timestep, keep[0, 0])
            timestep = timestep.expand(x.shape[0], *timestep.shape[1:])
            velocity = self.velocity(dit, x, timestep, contexts, extra, scales["high" if name == HIGH else "low"])
            x = scheduler.step(velocity, i, x)
            if first_latent is not None:
                x = (1 - keep) * first_latent + keep * x
        return x

    def velocity(self, dit, x, timestep, contexts: list[list[torch.Tensor]], extra: dict,
                 scale: torch.Tensor) -> torch.Tensor:
        """The DiT's velocity, guided when there are two context lists (classifier-free guidance: the prompts',
        the negative prompts'): both passes here, or (``cfg_p_size`` 2) this rank's and the other CFG rank's.
        ``scale``: each sample's guidance scale, ``[B, 1, 1, 1, 1]``."""
        if len(contexts) == 1:
            return dit(x, timestep, contexts[0], **extra)
        if self.layout is not None and self.layout.config.cfg_size == 2:
            cond, uncond = self.layout.cfg_pair(dit(x, timestep, contexts[self.layout.cfg_rank], **extra))
        else:
            cond, uncond = (dit(x, timestep, context, **extra) for context in contexts)
        return uncond + scale * (cond - uncond)


# Keywords of generate() that are inputs (images, videos), not settings -> the setting that gives them when left out.
INPUT_KEYWORDS = {"image": "image_path", "last_image": "last_frame_path", "src_video": "src_video",
                  "src_mask": "src_mask", "src_ref_images": "src_ref_images"}

# on_progress(phase, step, steps) -> True to stop
ProgressCallback = Callable[[str, int, int], Any]


class Cancelled(X2VError):
    """generate() stopped because its ``on_progress`` callback asked it to."""


@dataclass(frozen=True)
class Prepared:
    """One request of a generate call, its settings resolved and checked."""

    settings: Settings
    prompt: str
    images: tuple  # (first frame, last frame)
    vace_sources: tuple  # (src_video, src_mask, reference images)


def per_prompt(value, count: int, name: str) -> list:
    """``value`` for each of ``count`` prompts: a list of that length, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts; give one per prompt, or one value")
        return list(value)
    return [value] * count


def batch_signature(s: SamplingSettings, inputs: dict) -> tuple:
    """Requests with equal signatures can be denoised as one batch: the same schedule, the same latent and
    conditioning shapes (prompts, seeds, guidance scales and inputs may differ)."""
    shapes = tuple(sorted((key, tuple(v.shape)) for key, v in inputs.items()
                          if isinstance(v, torch.Tensor) and key not in ("cond", "uncond")))
    return (s.solver, s.steps, s.shift, s.cfg, s.denoising_steps, s.boundary, s.boundary_step,
            inputs.get("ref_frames", 0), shapes)


def stack_inputs(encoded: list[dict]) -> dict:
    """The encoded inputs of several requests as one batch: tensors concatenated on the batch dimension, the
    contexts as lists (their lengths differ; the DiT pads them)."""
    batch = {key: torch.cat([inputs[key] for inputs in encoded]) for key in
             ("noise", "y", "clip_fea", "vace_context", "first_latent") if key in encoded[0]}
    batch["contexts"] = [[inputs[key] for inputs in encoded] for key in ("cond", "uncond") if key in encoded[0]]
    return batch
