"""Offload (cpu_offload / offload_granularity / lazy_load / t5, clip, vae_cpu_offload) on a CPU "device": the same
scheduling code as on a GPU, and results identical to the resident model (docs/pitfalls.md D11).

The tiny checkpoints' safetensors views are not 64-byte aligned and CPU kernels round differently on unaligned
memory, so each reference model's weights are first copied to ordinary memory (``materialize``): the same
numbers, the memory offloaded copies also have.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from x2v.demo import TINY_DITS, random_weights, write_tiny_model
from x2v.formats.readers import home_block, read_checkpoint
from x2v.loading.dit import load_dit
from x2v.loading.lora import attach_loras
from x2v.loading.weights import assign_weights, build_on_meta
from x2v.models.wan_dit import FP32_PARAMS, WanDiT
from x2v.ops.quant_linear import QuantLinear
from x2v.ops.quant_math import quantize_weight
from x2v.errors import ConfigError
from x2v.pipelines.settings import resolve_settings
from x2v.pipelines.wan import HIGH, LOW, Pipeline
from x2v.runtime.offload import DiTOffload, OffloadConfig, block_units
from x2v.runtime.pages import FileMappings

KINDS = ("t2v", "i2v", "vace", "ti2v", "moe_t2v")
SMALL = dict(target_height=32, target_width=32, target_video_length=5, infer_steps=2)
IMAGE = torch.linspace(-1, 1, 3 * 48 * 80).reshape(3, 48, 80)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: write_tiny_model(root / kind, kind) for kind in KINDS}


def materialize(*modules: torch.nn.Module) -> None:
    """Every tensor into its own ordinary (aligned) memory; see the module docstring."""
    with torch.no_grad():
        for module in modules:
            for sub in module.modules():
                for store in (sub._parameters, sub._buffers):
                    for name, tensor in store.items():
                        if tensor is not None:
                            tensor.data = tensor.data.clone()


def dit_inputs(dit: WanDiT, seed: int = 0) -> tuple[tuple, dict]:
    cfg = dit.config
    g = torch.Generator().manual_seed(seed)
    latent = 48 if cfg.model_type == "ti2v" else 16
    x = torch.randn(1, latent, 2, 8, 8, generator=g)
    context = torch.randn(1, 7, cfg.text_dim, generator=g)
    timestep = torch.full((1, 2 * 4 * 4), 700.0) if cfg.model_type == "ti2v" else torch.tensor([700.0])
    extra = {}
    if cfg.in_dim > latent:
        extra["y"] = torch.randn(1, cfg.in_dim - latent, 2, 8, 8, generator=g)
    if cfg.image_branch:
        extra["clip_fea"] = torch.randn(1, cfg.image_tokens or 5, cfg.image_dim, generator=g)
    if cfg.vace_layers:
        extra["vace_context"] = torch.randn(1, cfg.vace_in_dim, 2, 8, 8, generator=g)
    return (x, timestep, context), extra


class HostReads(TorchDispatchMode):
    """Records every operation other than a copy that reads the given tensors' memory: offloaded compute must
    only ever see the device copies."""

    def __init__(self, tensors):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten.copy_.default:
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages for a in flat):
                self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def run_offloaded(dit, granularity, args, extra, **config):
    trace = []
    offload = DiTOffload({"dit": dit}, "cpu", OffloadConfig(cpu_offload=True, granularity=granularity, **config),
                         trace=trace)
    with torch.inference_mode(), offload.denoising():
        out = offload.activate("dit")(*args, **extra)
    vars(dit).pop("forward", None)  # unwrap (block / phase), so the model can be offloaded again
    return out, trace


@pytest.mark.parametrize("kind, granularity", [(kind, granularity) for kind in ("t2v", "i2v", "vace", "ti2v")
                                               for granularity in ("block", "phase")] + [("vace", "model")])
def test_offloaded_dit_equals_the_resident_one(models, kind, granularity):
    dit = load_dit(models[kind])
    materialize(dit)
    args, extra = dit_inputs(dit)
    with torch.inference_mode():
        expected = dit(*args, **extra)
    host = {name: t for name, t in [*dit.named_parameters(), *dit.named_buffers()]}
    with HostReads(host.values()) as reads:
        out, trace = run_offloaded(dit, granularity, args, extra)
    assert torch.equal(out, expected)
    assert reads.reads == []  # every weight came from its device copy, VACE's before/after_proj too
    assert {e for e, _ in trace} == {"load", "enter", "free"}
    after = dict([*dit.named_parameters(), *dit.named_buffers()])
    assert after.keys() == host.keys() and all(after[k] is host[k] for k in host)  # the host tensors, untouched


def deep_dit(layers: int = 4) -> WanDiT:
    """A DiT with more blocks than the tiny checkpoints, weights in memory."""
    cfg = replace(TINY_DITS["vace"], num_layers=layers, vace_layers=(0, 2))
    model = build_on_meta(lambda: WanDiT(cfg))
    return assign_weights(model, random_weights(model, seed=5), dtype=torch.float32, keep_fp32=FP32_PARAMS)


@pytest.mark.parametrize("granularity", ["block", "phase"])
def test_next_unit_is_copied_before_the_current_one_runs_and_two_at_most_are_loaded(granularity):
    dit = deep_dit()
    args, extra = dit_inputs(dit)
    _, trace = run_offloaded(dit, granularity, args, extra)
    order = [u.name for u in block_units(dit, dit.OFFLOAD_BLOCKS, granularity)]
    assert [name for event, name in trace if event == "enter" and name != "rest"] == order
    for current, following in zip(order, order[1:]):
        assert trace.index(("load", following)) < trace.index(("enter", current))
    loaded, most = set(), 0
    for event, name in trace:
        if name != "rest":
            loaded = loaded | {name} if event == "load" else loaded - {name} if event == "free" else loaded
            most = max(most, len(loaded))
    assert most == 2 and not loaded


def test_mixed_blocks_quantized_layers_and_lora_branches_move_with_their_block(tmp_path):
    """Blocks of different layouts (one int8 layer, a LoRA branch on another block; docs/pitfalls.md A19)."""
    dit = deep_dit()
    layer = dit.blocks[1].ffn[0]
    quantized = QuantLinear(layer.in_features, layer.out_features, True, "int8", torch.float32)
    weight, scale = quantize_weight(layer.weight, "int8")
    quantized.weight.data, quantized.weight_scale, quantized.bias.data = weight, scale, layer.bias.data
    dit.blocks[1].ffn[0] = quantized
    g = torch.Generator().manual_seed(3)
    lora = {"diffusion_model.blocks.2.self_attn.q.lora_down.weight": torch.randn(4, 128, generator=g),
            "diffusion_model.blocks.2.self_attn.q.lora_up.weight": torch.randn(128, 4, generator=g)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    attach_loras(dit, [str(tmp_path / "lora.safetensors")])
    args, extra = dit_inputs(dit)
    with torch.inference_mode():
        expected = dit(*args, **extra)
    host = [*dit.parameters(), *dit.buffers()]
    with HostReads(host) as reads:
        out, trace = run_offloaded(dit, "block", args, extra)
    assert torch.equal(out, expected) and reads.reads == []
    assert ("enter", "blocks.1") in trace and ("enter", "blocks.2") in trace


def write_block_split(source, directory) -> None:
    tensors = read_checkpoint(source / "diffusion_pytorch_model.safetensors.index.json")
    directory.mkdir()
    files: dict[str, dict] = {}
    for name, tensor in tensors.items():
        home = home_block(name)
        files.setdefault("non_block" if home is None else f"block_{home}", {})[name] = tensor.contiguous()
    for stem, part in files.items():
        save_file(part, str(directory / f"{stem}.safetensors"))
    (directory / "config.json").write_text((source / "config.json").read_text())


@pytest.mark.parametrize("layout", ["block-split", "single file"])
def test_lazy_load_streams_blocks_from_the_file(models, tmp_path, layout):
    if layout == "block-split":
        path = tmp_path / "split"
        write_block_split(models["vace"], path)
    else:
        path = tmp_path / "vace.safetensors"
        save_file({k: v.contiguous() for k, v in read_checkpoint(
            models["vace"] / "diffusion_pytorch_model.safetensors.index.json").items()}, str(path))
    reference = load_dit(path)
    materialize(reference)
    args, extra = dit_inputs(reference)
    with torch.inference_mode():
        expected = reference(*args, **extra)
    lazy = load_dit(path)
    for granularity in ("block", "phase"):
        out, trace = run_offloaded(lazy, granularity, args, extra, lazy_load=True, disk_workers=2)
        assert torch.equal(out, expected)
    mappings = FileMappings()
    assert all(mappings.pages(p) is not None for p in lazy.blocks.parameters() if p.ndim == 2)  # still file views


def test_lazy_load_refuses_blocks_converted_at_load(models):
    dit = load_dit(models["t2v"], dtype=torch.bfloat16)  # float32 file: the blocks were cast at load
    with pytest.raises(ConfigError, match="x2v convert .* --layout block-split"):
        DiTOffload({"dit": dit}, "cpu", OffloadConfig(cpu_offload=True, lazy_load=True))


@pytest.mark.parametrize("settings, message", [
    ({"cpu_offload": True, "offload_granularity": "layer"}, "offload_granularity must be one of block, phase, model"),
    ({"lazy_load": True}, "lazy_load needs cpu_offload: true"),
    ({"cpu_offload": True, "lazy_load": True, "offload_granularity": "model"}, 'must be "block" or "phase"'),
    ({"cpu_offload": True, "lazy_load": True, "lora_configs": [{"path": "l.safetensors"}]}, "lora_dynamic_apply"),
    ({"cpu_offload": True, "num_disk_workers": 0}, "num_disk_workers must be a positive integer"),
    ({"cpu_offload": "yes"}, "cpu_offload must be true or false"),
    ({"cpu_offload": True, "use_compile": True}, "use_compile"),
])
def test_offload_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        resolve_settings(config_json=settings)


def offload_of(config: dict) -> OffloadConfig:
    return resolve_settings(config_json=config).offload


def test_encoder_offload_follows_cpu_offload_unless_set():
    config = offload_of({"cpu_offload": True, "vae_cpu_offload": False})
    assert (config.granularity, config.t5, config.clip, config.vae, config.disk_workers) == ("block", True, True,
                                                                                              False, 4)
    assert not offload_of({}).t5
    assert offload_of({"t5_cpu_offload": True}).place("t5", torch.device("cuda")).type == "cpu"


def test_offload_keys_are_known_and_acted_on():
    keys = {"cpu_offload": True, "offload_granularity": "phase", "lazy_load": False, "num_disk_workers": 2,
            "t5_cpu_offload": True, "clip_cpu_offload": True, "vae_cpu_offload": True}
    settings = resolve_settings(config_json=keys).for_model("wan2.1", "t2v")
    assert settings.warnings == ()
    assert settings.offload == OffloadConfig(True, "phase", False, 2, True, True, True)
    settings = resolve_settings(config_json={"unload_modules": True}).for_model("wan2.1", "t2v")
    assert len(settings.warnings) == 1 and "unload_modules" in settings.warnings[0]


def pipeline_pair(model, **settings):
    plain = Pipeline.from_pretrained(model, device="cpu", **SMALL)
    offloaded = Pipeline.from_pretrained(model, device="cpu", **SMALL, **settings)
    materialize(*plain.dits.values(), plain.text_encoder, plain.vae, *([plain.clip] if plain.clip else []))
    return plain, offloaded


@pytest.mark.parametrize("kind, granularity, inputs", [("t2v", "block", {}), ("i2v", "phase", {"image": IMAGE}),
                                                       ("moe_t2v", "model", {"infer_steps": 4})])
def test_generate_with_cpu_offload_equals_without(models, kind, granularity, inputs):
    plain, offloaded = pipeline_pair(models[kind], cpu_offload=True, offload_granularity=granularity)
    trace = offloaded.offload.streamer.trace = []
    expected = plain.generate("a cat", seed=1, progress=False, **inputs).video
    assert torch.equal(offloaded.generate("a cat", seed=1, progress=False, **inputs).video, expected)
    assert not offloaded.offload.streamer.loaded  # everything back in host memory after the loop
    if kind == "moe_t2v":  # the low-noise expert is copied while the high-noise one still computes
        assert trace.index(("load", LOW)) < trace.index(("free", HIGH)) < trace.index(("enter", LOW))


def test_lazy_load_pipeline_with_a_dynamic_lora(models, tmp_path):
    g = torch.Generator().manual_seed(4)
    lora = {"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(2, 128, generator=g),
            "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(256, 2, generator=g)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    loras = {"lora_configs": [{"path": str(tmp_path / "lora.safetensors")}], "lora_dynamic_apply": True}
    plain, lazy = pipeline_pair(models["t2v"], cpu_offload=True, lazy_load=True, **loras)
    plain.load_lora(tmp_path / "lora.safetensors")
    expected = plain.generate("a dog", seed=2, progress=False).video
    assert torch.equal(lazy.generate("a dog", seed=2, progress=False).video, expected)
