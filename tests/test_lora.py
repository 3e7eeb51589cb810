"""LoRA: every key convention on tiny models, merged weights against the formula computed here, dynamic mode,
Wan2.2 experts, the report, quantized bases, and the memory bound of merging a 14B-shaped model."""

from __future__ import annotations

import logging
import weakref
import zlib

import pytest
import torch
from safetensors.torch import save_file

import x2v
from x2v.demo import TINY_DITS, write_dit
from x2v.errors import CheckpointError, UnsupportedModelError
from x2v.formats.dit_keys import official_key_to_diffusers
from x2v.formats.lora_keys import UNRECOGNIZED
from x2v.loading import lora
from x2v.loading.lora import LoraDeltas, LoraEntry, attach_loras, detach_loras, merge_loras, prepare_loras
from x2v.loading.weights import build_on_meta
from x2v.models.wan_dit import WanDiT, WanDiTConfig
from x2v.ops.quant_linear import QuantLinear
from x2v.ops.quant_math import quantize_weight
from x2v.runtime.lora_branches import LoraBranch

HIGH, LOW = "high_noise_model", "low_noise_model"
RANK = 4
# Block and top-level linears of several shapes and dtypes (head.head and time_projection stay float32).
BASES = ("blocks.0.self_attn.q", "blocks.1.cross_attn.k", "blocks.0.ffn.0", "blocks.1.ffn.2", "head.head",
         "text_embedding.0", "time_projection.1")


def diffusers_name(base: str) -> str:
    return official_key_to_diffusers(f"{base}.")[:-1]


# convention -> (stem of an official module base, up suffix, down suffix, whether it carries .alpha)
CONVENTIONS = {
    "lightx2v": (lambda b: f"diffusion_model.{b}", ".lora_up.weight", ".lora_down.weight", True),
    "lightx2v_AB": (lambda b: f"diffusion_model.{b}", ".lora_B.weight", ".lora_A.weight", True),
    "comfyui": (lambda b: f"model.diffusion_model.{b}", ".lora_up.weight", ".lora_down.weight", True),
    "diffusers": (lambda b: f"transformer.{diffusers_name(b)}", ".lora_B.weight", ".lora_A.weight", False),
    "kohya": (lambda b: f"lora_unet_{b.replace('.', '_')}", ".lora_up.weight", ".lora_down.weight", True),
    "wan_fun": (lambda b: f"lora_unet__{b.replace('.', '_')}", ".lora_up.weight", ".lora_down.weight", True),
}
PAIR_SUFFIXES = [
    (".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"), (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_models")
    write_dit(root / "t2v", TINY_DITS["t2v"], seed=1)
    write_dit(root / "i2v", TINY_DITS["i2v"], seed=2)
    for seed, expert in enumerate((HIGH, LOW), start=3):
        write_dit(root / "moe" / expert, TINY_DITS["moe_i2v"], seed)
    return root


def load(path, **kw):
    return x2v.load_dit(path, dtype=kw.pop("dtype", torch.bfloat16), **kw)


def pristine(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def random_pairs(model, bases=BASES, rank=RANK, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """official base -> (up [out, r], down [r, in]) in bfloat16, as files usually store them."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    pairs = {}
    for base in bases:
        out_features, in_features = shapes[f"{base}.weight"]
        pairs[base] = (0.1 * torch.randn(out_features, rank, generator=g)).bfloat16(), \
            (0.1 * torch.randn(rank, in_features, generator=g)).bfloat16()
    return pairs


def write_pairs(path, pairs, stem, up_suffix, down_suffix, alpha=None):
    tensors = {}
    for base, (up, down) in pairs.items():
        tensors[f"{stem(base)}{up_suffix}"] = up
        tensors[f"{stem(base)}{down_suffix}"] = down
        if alpha is not None:
            tensors[f"{stem(base)}.alpha"] = alpha.clone()
    save_file(tensors, str(path))
    return str(path)


def merged(weight: torch.Tensor, up, down, strength: float, alpha: float | None) -> torch.Tensor:
    """The formula, independently: W + strength · (alpha / rank) · up @ down in float32, cast once."""
    scale = alpha / down.shape[0] if alpha else 1.0
    return (weight.float() + strength * scale * (up.float() @ down.float())).to(weight.dtype)


def assert_only_changed(model, before, expected: dict[str, torch.Tensor]):
    for key, value in model.state_dict().items():
        want = expected.get(key, before[key])
        assert value.dtype == want.dtype and torch.equal(value, want), key


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([700.0]), torch.randn(1, 5, 64, generator=g)


# --- conventions and the formula ---------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_every_convention_merges_to_the_formula(dirs, tmp_path, convention):
    stem, up_suffix, down_suffix, has_alpha = CONVENTIONS[convention]
    model = load(dirs / "t2v")
    before, pairs = pristine(model), random_pairs(model)
    alpha = torch.tensor(2.0) if has_alpha else None
    path = write_pairs(tmp_path / "l.safetensors", pairs, stem, up_suffix, down_suffix, alpha)
    report, = merge_loras(model, [{"path": path, "strength": 0.8}])
    expected = {f"{b}.weight": merged(before[f"{b}.weight"], up, down, 0.8, 2.0 if has_alpha else None)
                for b, (up, down) in pairs.items()}
    assert_only_changed(model, before, expected)
    tensors = len(BASES) * (3 if has_alpha else 2)
    assert (report.matched, report.total, report.pairs, report.skipped) == (tensors, tensors, len(BASES), {})


@pytest.mark.parametrize("suffixes", PAIR_SUFFIXES, ids=[s[0] for s in PAIR_SUFFIXES])
def test_every_pair_suffix(dirs, tmp_path, suffixes):
    model = load(dirs / "t2v")
    before, pairs = pristine(model), random_pairs(model, bases=BASES[:2])
    path = write_pairs(tmp_path / "l.safetensors", pairs, lambda b: f"diffusion_model.{b}", *suffixes)
    merge_loras(model, [path])
    assert_only_changed(model, before, {f"{b}.weight": merged(before[f"{b}.weight"], u, d, 1.0, None)
                                        for b, (u, d) in pairs.items()})


@pytest.mark.parametrize("file_alpha, config_alpha, used", [
    (torch.tensor(8, dtype=torch.int64), None, 8.0),  # 0-dim int64 (Wan2.2-Lightning)
    (torch.tensor([16.0]), None, 16.0),
    (torch.tensor(8.0, dtype=torch.bfloat16), 2.0, 2.0),  # lora_configs wins
    (None, 3.0, 3.0),
    (None, None, None),  # neither: scale 1
    (torch.tensor(0.0), None, None),  # alpha 0 means none (ComfyUI)
])
def test_alpha_rules(dirs, tmp_path, file_alpha, config_alpha, used):
    model = load(dirs / "t2v")
    before, pairs = pristine(model), random_pairs(model, bases=BASES[:1])
    path = write_pairs(tmp_path / "l.safetensors", pairs, lambda b: f"diffusion_model.{b}", ".lora_up.weight",
                       ".lora_down.weight", file_alpha)
    merge_loras(model, [{"path": path, "strength": 0.5, "alpha": config_alpha}])
    (base, (up, down)), = pairs.items()
    assert_only_changed(model, before, {f"{base}.weight": merged(before[f"{base}.weight"], up, down, 0.5, used)})


def test_diffs_and_peft_bias(dirs, tmp_path):
    model = load(dirs / "t2v")
    before = pristine(model)
    g = torch.Generator().manual_seed(1)
    diffs = {  # file key -> official key
        "diffusion_model.blocks.0.norm3.diff": "blocks.0.norm3.weight",
        "diffusion_model.blocks.0.self_attn.q.diff_b": "blocks.0.self_attn.q.bias",
        "diffusion_model.blocks.1.diff_m": "blocks.1.modulation",
        "diffusion_model.head.diff_m": "head.modulation",
        "diffusion_model.head.head.diff": "head.head.weight",
    }
    tensors = {k: 0.1 * torch.randn(before[v].shape, generator=g) for k, v in diffs.items()}
    save_file(tensors, str(tmp_path / "diff.safetensors"))
    peft = {"transformer.blocks.1.attn1.to_k.lora_A.weight": 0.1 * torch.randn(RANK, 128, generator=g),
            "transformer.blocks.1.attn1.to_k.lora_B.weight": 0.1 * torch.randn(128, RANK, generator=g),
            "transformer.blocks.1.attn1.to_k.lora_B.bias": 0.1 * torch.randn(128, generator=g)}
    save_file(peft, str(tmp_path / "peft.safetensors"))
    reports = merge_loras(model, [{"path": str(tmp_path / "diff.safetensors"), "strength": 0.7},
                                  {"path": str(tmp_path / "peft.safetensors"), "strength": 0.5}])
    expected = {v: (before[v].float() + 0.7 * tensors[k]).to(before[v].dtype) for k, v in diffs.items()}
    a, b, bias = peft.values()
    expected["blocks.1.self_attn.k.weight"] = merged(before["blocks.1.self_attn.k.weight"], b, a, 0.5, None)
    expected["blocks.1.self_attn.k.bias"] = (before["blocks.1.self_attn.k.bias"].float() + 0.5 * bias).bfloat16()
    assert_only_changed(model, before, expected)
    assert [(r.pairs, r.diffs, r.matched) for r in reports] == [(0, 5, 5), (1, 1, 3)]


def test_strength_zero_is_a_no_op(dirs, tmp_path):
    model = load(dirs / "t2v")
    before = pristine(model)
    path = write_pairs(tmp_path / "l.safetensors", random_pairs(model), lambda b: f"diffusion_model.{b}",
                       ".lora_up.weight", ".lora_down.weight", torch.tensor(4.0))
    assert merge_loras(model, [{"path": path, "strength": 0.0}])[0].pairs == len(BASES)
    assert_only_changed(model, before, {})


def test_several_loras_sum_in_float32(dirs, tmp_path):
    model = load(dirs / "t2v")
    before = pristine(model)
    first, second = random_pairs(model, seed=1), random_pairs(model, seed=2)
    stem = lambda b: f"diffusion_model.{b}"  # noqa: E731
    paths = [write_pairs(tmp_path / f"{i}.safetensors", p, stem, ".lora_up.weight", ".lora_down.weight")
             for i, p in enumerate((first, second))]
    merge_loras(model, [{"path": paths[0], "strength": 0.6}, {"path": paths[1], "strength": 1.2}])
    expected = {}
    for base in BASES:
        (u1, d1), (u2, d2) = first[base], second[base]
        total = 0.6 * (u1.float() @ d1.float()) + 1.2 * (u2.float() @ d2.float())
        w = before[f"{base}.weight"]
        expected[f"{base}.weight"] = (w.float() + total).to(w.dtype)
    assert_only_changed(model, before, expected)


def test_prepare_needs_only_the_shape_map(dirs, tmp_path):
    """The converter's use: a key -> shape map, then one delta per tensor while streaming."""
    model = load(dirs / "t2v")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    pairs = random_pairs(model, bases=BASES[:2])
    path = write_pairs(tmp_path / "l.safetensors", pairs, lambda b: f"lora_unet_{b.replace('.', '_')}",
                       ".lora_up.weight", ".lora_down.weight", torch.tensor(2, dtype=torch.int64))
    deltas, reports = prepare_loras([LoraEntry(path, strength=0.3)], shapes, model_description="test model")
    assert isinstance(deltas, LoraDeltas) and deltas.keys() == {f"{b}.weight" for b in pairs}
    for base, (up, down) in pairs.items():
        assert torch.equal(deltas.delta(f"{base}.weight"), 0.3 * (2 / RANK) * (up.float() @ down.float()))
    assert deltas.delta("blocks.0.self_attn.k.weight") is None
    assert reports[0].model == "test model"


# --- dynamic mode -------------------------------------------------------------------------------------------------


def test_dynamic_matches_merged_and_detach_restores_bit_exact(dirs, tmp_path):
    stem = lambda b: f"diffusion_model.{b}"  # noqa: E731
    base_model = load(dirs / "t2v", dtype=torch.float32)
    lora_a = write_pairs(tmp_path / "a.safetensors", random_pairs(base_model, seed=1), stem, ".lora_up.weight",
                         ".lora_down.weight", torch.tensor(8.0))
    g = torch.Generator().manual_seed(2)
    save_file({"diffusion_model.blocks.0.diff_m": 0.1 * torch.randn(1, 6, 128, generator=g),
               "diffusion_model.blocks.1.self_attn.o.diff_b": 0.1 * torch.randn(128, generator=g),
               **{f"diffusion_model.{b}.lora_{r}.weight": t for b, (u, d) in random_pairs(base_model, seed=3).items()
                  for r, t in (("up", u), ("down", d))}}, str(tmp_path / "b.safetensors"))
    entries = [{"path": lora_a, "strength": 0.7}, {"path": str(tmp_path / "b.safetensors"), "strength": 0.4}]
    x, t, context = inputs()
    with torch.no_grad():
        base_out = base_model(x, t, context)
        merged_model = load(dirs / "t2v", dtype=torch.float32)
        merge_loras(merged_model, entries)
        merged_out = merged_model(x, t, context)
        dynamic = load(dirs / "t2v", dtype=torch.float32)
        before = dict(dynamic.state_dict())  # the tensors themselves: a restore must bring back the same values
        attach_loras(dynamic, entries[:1])
        attach_loras(dynamic, entries[1:])  # added on top: one branch with both LoRAs' ranks
        assert dynamic.blocks[0].self_attn.q.lora_branch.down.shape[0] == 2 * RANK
        assert set(dynamic.state_dict()) == set(before)  # branches are not part of the state dict
        dynamic_out = dynamic(x, t, context)
        detach_loras(dynamic)
        restored_out = dynamic(x, t, context)
    torch.testing.assert_close(dynamic_out, merged_out, rtol=1e-4, atol=1e-4)
    assert (dynamic_out - base_out).abs().max() > 1e-2  # the LoRAs do change the output
    assert torch.equal(restored_out, base_out)
    for key, value in dynamic.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(isinstance(m, LoraBranch) for m in dynamic.modules())
    assert dynamic.blocks[0].self_attn.q._forward_hooks == {}
    assert lora.attached_loras(dynamic) == []


def test_dynamic_strengths_are_tensors(dirs, tmp_path):
    """Strengths live in a float32 tensor (docs/pitfalls.md C11): changing one is a tensor write, not a new graph."""
    model = load(dirs / "t2v")
    pairs = random_pairs(model, bases=BASES[:1])
    path = write_pairs(tmp_path / "l.safetensors", pairs, lambda b: f"diffusion_model.{b}", ".lora_up.weight",
                       ".lora_down.weight", torch.tensor(2.0))
    attach_loras(model, [{"path": path, "strength": 0.5}])
    branch = model.blocks[0].self_attn.q.lora_branch
    assert branch.scales.dtype == torch.float32 and torch.equal(branch.scales, torch.full((RANK,), 0.5 * 2 / RANK))
    assert branch.down.dtype == torch.bfloat16  # the layer's compute dtype


def test_set_lora_strength_equals_attaching_at_that_strength(dirs, tmp_path):
    """Pairs (branch scales written in place) and diffs (recomputed from the original) both follow the change."""
    base = load(dirs / "t2v", dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    path = str(tmp_path / "mixed.safetensors")
    save_file({"diffusion_model.blocks.0.diff_m": 0.1 * torch.randn(1, 6, 128, generator=g),
               "diffusion_model.blocks.1.self_attn.o.diff_b": 0.1 * torch.randn(128, generator=g),
               **{f"diffusion_model.{b}.lora_{r}.weight": t for b, (u, d) in random_pairs(base, seed=5).items()
                  for r, t in (("up", u), ("down", d))}}, path)
    x, t, context = inputs()
    changed, fresh = load(dirs / "t2v", dtype=torch.float32), load(dirs / "t2v", dtype=torch.float32)
    attach_loras(changed, [{"path": path, "strength": 0.3}])
    scales = changed.blocks[0].self_attn.q.lora_branch.scales
    lora.set_lora_strength(changed, path, 1.2)
    attach_loras(fresh, [{"path": path, "strength": 1.2}])
    assert changed.blocks[0].self_attn.q.lora_branch.scales is scales  # written in place: no new graph input
    with torch.no_grad():
        assert torch.equal(changed(x, t, context), fresh(x, t, context))
    assert lora.attached_loras(changed)[0].strength == 1.2
    before = {k: v.clone() for k, v in base.state_dict().items()}
    detach_loras(changed)
    for key, value in changed.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="not attached at run time"):
        lora.set_lora_strength(changed, path, 1.0)


# --- Wan2.2 experts -----------------------------------------------------------------------------------------------


def test_wan22_entries_go_to_the_expert_they_name(dirs, tmp_path):
    stem = lambda b: f"diffusion_model.{b}"  # noqa: E731
    reference = load(dirs / "moe", expert=HIGH)
    high_pairs, low_pairs = random_pairs(reference, seed=1), random_pairs(reference, seed=2)
    high = write_pairs(tmp_path / "high.safetensors", high_pairs, stem, ".lora_up.weight", ".lora_down.weight")
    low = write_pairs(tmp_path / "low.safetensors", low_pairs, stem, ".lora_up.weight", ".lora_down.weight")
    configs = [{"path": high, "name": HIGH}, {"path": low, "name": LOW, "strength": 0.5}]
    for expert, pairs, strength in ((HIGH, high_pairs, 1.0), (LOW, low_pairs, 0.5)):
        before = pristine(load(dirs / "moe", expert=expert))
        model = load(dirs / "moe", expert=expert, lora_configs=configs)
        assert_only_changed(model, before, {f"{b}.weight": merged(before[f"{b}.weight"], u, d, strength, None)
                                            for b, (u, d) in pairs.items()})
        assert [r.path for r in model.load_info["loras"]] == [high if expert == HIGH else low]
    with pytest.raises(ValueError, match='needs "name": "high_noise_model" or "low_noise_model"'):
        load(dirs / "moe", expert=HIGH, lora_configs=[high])
    with pytest.raises(ValueError, match="name both Wan2.2 experts"):
        load(dirs / "moe" / HIGH, lora_configs=configs)


# --- the report and errors ----------------------------------------------------------------------------------------


def wan21_i2v_lora(path) -> str:
    """A LightX2V-style Wan2.1 I2V LoRA: block pairs plus image-branch pairs and diffs, and one stray key."""
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for i in range(2):
        for part in ("self_attn.q", "cross_attn.k_img", "cross_attn.v_img"):
            tensors[f"diffusion_model.blocks.{i}.{part}.lora_up.weight"] = torch.randn(128, RANK, generator=g)
            tensors[f"diffusion_model.blocks.{i}.{part}.lora_down.weight"] = torch.randn(RANK, 128, generator=g)
        tensors[f"diffusion_model.blocks.{i}.cross_attn.norm_k_img.diff"] = torch.randn(128, generator=g)
    tensors["diffusion_model.img_emb.proj.1.diff_b"] = torch.randn(64, generator=g)
    tensors["diffusion_model.blocks.0.self_attn.q.alpha"] = torch.tensor(RANK, dtype=torch.int64)
    tensors["optimizer.step"] = torch.tensor(3)
    save_file(tensors, str(path))
    return str(path)


def test_report_lists_what_was_skipped_and_why(dirs, tmp_path, caplog):
    path = wan21_i2v_lora(tmp_path / "i2v.safetensors")
    with caplog.at_level(logging.WARNING, logger="x2v"):
        model = load(dirs / "moe", expert=HIGH, lora_configs=[{"path": path, "name": HIGH}])
    report, = model.load_info["loras"]
    assert (report.matched, report.total, report.pairs) == (5, 17, 2)
    image = "image-branch keys for Wan2.1 I2V/FLF2V; this Wan2.2 I2V expert (high_noise_model) has none"
    assert set(report.skipped) == {image, UNRECOGNIZED}
    assert len(report.skipped[image]) == 2 * 5 + 1 and report.skipped[UNRECOGNIZED] == ["optimizer.step"]
    assert report.made_for.startswith("Wan2.1 I2V (dim 128, 2 blocks")
    text = report.summary()
    assert "matched 5 of 17 tensors" in text and image in text and "blocks.N.cross_attn.k_img" in text
    assert text in caplog.text  # always printed, at a level the command line shows

    same_model = load(dirs / "i2v", lora_configs=[path])  # the model it was made for: only the stray key skipped
    assert same_model.load_info["loras"][0].matched == 16


def test_strict_and_nothing_matched_are_errors(dirs, tmp_path):
    path = wan21_i2v_lora(tmp_path / "i2v.safetensors")
    model = load(dirs / "t2v")
    before = pristine(model)
    with pytest.raises(CheckpointError, match="lora_strict is true and 12 tensor"):
        merge_loras(model, [path], strict=True)
    save_file({"diffusion_model.blocks.0.cross_attn.k_img.diff": torch.ones(128)}, str(tmp_path / "img.safetensors"))
    with pytest.raises(CheckpointError, match="no tensor of this LoRA applies"):
        merge_loras(model, [str(tmp_path / "img.safetensors")])
    assert_only_changed(model, before, {})


def test_shape_mismatch_names_the_lora_and_both_shapes(dirs, tmp_path):
    model = load(dirs / "t2v")
    before = pristine(model)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(5120, 4),
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 5120)},
              str(tmp_path / "big.safetensors"))
    good = write_pairs(tmp_path / "good.safetensors", random_pairs(model), lambda b: f"diffusion_model.{b}",
                       ".lora_up.weight", ".lora_down.weight")
    with pytest.raises(CheckpointError) as error:
        merge_loras(model, [good, str(tmp_path / "big.safetensors")])
    message = str(error.value)
    assert "big.safetensors" in message and "(5120, 4)" in message and "(4, 5120)" in message
    assert "(128, 128)" in message and "Wan2.1 T2V-14B or a Wan2.2 A14B expert" in message
    assert_only_changed(model, before, {})  # checked before anything was applied, the good LoRA included


@pytest.mark.parametrize("key, kind", [
    ("lora_unet_blocks_0_self_attn_q.hada_w1_a", "LoHa"),
    ("lora_unet_blocks_0_self_attn_q.lokr_w1", "LoKr"),
    ("diffusion_model.blocks.0.self_attn.q.dora_scale", "DoRA"),
    ("transformer.blocks.0.attn1.to_q.lora_magnitude_vector", "DoRA"),
])
def test_loha_lokr_dora_are_refused(dirs, tmp_path, key, kind):
    save_file({key: torch.ones(4, 4), "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(128, 4),
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 128)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(UnsupportedModelError, match=kind):
        merge_loras(load(dirs / "t2v"), [str(tmp_path / "x.safetensors")])


def test_broken_files_are_errors(dirs, tmp_path):
    model = load(dirs / "t2v")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(128, 4)},
              str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="no matching down tensor"):
        merge_loras(model, [str(tmp_path / "half.safetensors")])
    save_file({"diffusion_model.blocks.0.norm3.diff": torch.ones(128),
               "lora_unet_blocks_0_norm3.diff": torch.ones(128)}, str(tmp_path / "twice.safetensors"))
    with pytest.raises(CheckpointError, match="both give the diff of blocks.0.norm3.weight"):
        merge_loras(model, [str(tmp_path / "twice.safetensors")])
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(128, 4),
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 128),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.ones(2)}, str(tmp_path / "alpha.safetensors"))
    with pytest.raises(CheckpointError, match="is not one finite number"):
        merge_loras(model, [str(tmp_path / "alpha.safetensors")])
    with pytest.raises(CheckpointError, match="LoRA file not found"):
        merge_loras(model, [str(tmp_path / "missing.safetensors")])


# --- quantized bases ----------------------------------------------------------------------------------------------


def quantize_layer(model, kind: str) -> QuantLinear:
    float_layer = model.blocks[0].self_attn.q
    layer = QuantLinear(128, 128, True, kind, torch.float32)
    layer.weight.data, layer.weight_scale = quantize_weight(float_layer.weight.float(), kind)
    layer.bias.data = float_layer.bias.data
    model.blocks[0].self_attn.q = layer
    return layer


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_layer_merges_by_dequantize_add_requantize(dirs, tmp_path, kind):
    model = load(dirs / "t2v", dtype=torch.float32)
    layer = quantize_layer(model, kind)
    w = layer.dequantized_weight(torch.float32)
    pairs = random_pairs(model, bases=BASES[:1])
    path = write_pairs(tmp_path / "l.safetensors", pairs, lambda b: f"diffusion_model.{b}", ".lora_up.weight",
                       ".lora_down.weight", torch.tensor(2.0))
    merge_loras(model, [path])
    up, down = pairs[BASES[0]]
    target = w + (2.0 / RANK) * (up.float() @ down.float())
    # fp8: stochastic rounding seeded by the tensor's name (CRC-32), int8: to nearest
    generator = torch.Generator().manual_seed(zlib.crc32(b"blocks.0.self_attn.q.weight")) if kind == "fp8" else None
    q, scale = quantize_weight(target, kind, generator=generator)
    assert layer.weight.dtype == q.dtype and torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)


def test_quantized_layer_dynamic_branch_and_exact_detach(dirs, tmp_path):
    model = load(dirs / "t2v", dtype=torch.float32)
    layer = quantize_layer(model, "int8")
    weight, scale = layer.weight.clone(), layer.weight_scale.clone()
    pairs = random_pairs(model, bases=BASES[:1])
    path = write_pairs(tmp_path / "l.safetensors", pairs, lambda b: f"diffusion_model.{b}", ".lora_up.weight",
                       ".lora_down.weight")
    save_file({"diffusion_model.blocks.0.self_attn.q.diff": torch.full((128, 128), 0.01)},
              str(tmp_path / "d.safetensors"))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer(x)
        attach_loras(model, [{"path": path, "strength": 0.5}])
        up, down = pairs[BASES[0]]
        torch.testing.assert_close(layer(x), base + 0.5 * (x @ down.float().T) @ up.float().T, rtol=1e-3, atol=1e-3)
        attach_loras(model, [str(tmp_path / "d.safetensors")])  # a diff: dequantize, add, re-quantize
        assert not torch.equal(layer.weight, weight)
        detach_loras(model)
        assert torch.equal(layer.weight, weight) and torch.equal(layer.weight_scale, scale)
        assert torch.equal(layer(x), base)


# --- memory -------------------------------------------------------------------------------------------------------


def test_merging_a_14b_shaped_model_goes_one_tensor_at_a_time(tmp_path, monkeypatch):
    """A Wan2.1-14B-shaped DiT on the meta device (no memory), a rank-1 LoRA on every block linear: each delta is
    gone before the next is computed, on the weight's own device (nothing of the model is copied to the CPU)."""
    config = WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
    model = build_on_meta(lambda: WanDiT(config)).to(torch.bfloat16)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    tensors = {}
    for name in linears:
        out_features, in_features = model.get_submodule(name).weight.shape
        tensors[f"diffusion_model.{name}.lora_up.weight"] = torch.full((out_features, 1), 0.01, dtype=torch.bfloat16)
        tensors[f"diffusion_model.{name}.lora_down.weight"] = torch.full((1, in_features), 0.01, dtype=torch.bfloat16)
    save_file(tensors, str(tmp_path / "l.safetensors"))
    alive: list[weakref.ref] = []
    compute = LoraDeltas.delta

    def tracked(self, key, device=None, **kw):
        assert all(ref() is None for ref in alive), "an earlier delta is still alive"
        result = compute(self, key, device, **kw)
        alive.append(weakref.ref(result))
        return result

    monkeypatch.setattr(LoraDeltas, "delta", tracked)
    report, = merge_loras(model, [str(tmp_path / "l.safetensors")])
    assert report.pairs == len(linears) == 400 and len(alive) == 400
    assert "Wan2.1 T2V-14B or a Wan2.2 A14B expert (dim 5120, 40 blocks" in report.made_for
    assert all(t.is_meta and t.dtype == torch.bfloat16 for t in model.state_dict().values())


# --- pipeline -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_models(tmp_path_factory):
    from x2v.demo import write_tiny_model

    root = tmp_path_factory.mktemp("lora_pipelines")
    return {kind: write_tiny_model(root / kind, kind) for kind in ("t2v", "moe_t2v")}


SMALL = dict(target_height=32, target_width=32, target_video_length=5, infer_steps=1)


def test_pipeline_lora_configs_load_lora_and_unload(pipeline_models, tmp_path):
    from x2v.pipelines.wan import Pipeline

    stem = lambda b: f"diffusion_model.{b}"  # noqa: E731
    base = x2v.load_dit(pipeline_models["t2v"], dtype=torch.float32)
    before = pristine(base)
    first = write_pairs(tmp_path / "a.safetensors", random_pairs(base, seed=1), stem, ".lora_up.weight",
                        ".lora_down.weight")
    second = write_pairs(tmp_path / "b.safetensors", random_pairs(base, seed=2), stem, ".lora_up.weight",
                         ".lora_down.weight")
    merge_loras(base, [{"path": first, "strength": 0.5}])
    merged_pipe = Pipeline.from_pretrained(pipeline_models["t2v"], device="cpu", dtype=torch.float32,
                                           lora_configs=[{"path": first, "strength": 0.5}], **SMALL)
    assert_only_changed(merged_pipe.dits["dit"], pristine(base), {})

    pipe = Pipeline.from_pretrained(pipeline_models["t2v"], device="cpu", dtype=torch.float32,
                                    lora_configs=[{"path": first, "strength": 0.5}], lora_dynamic_apply=True, **SMALL)
    dit = pipe.dits["dit"]
    assert [r.path for r in lora.attached_loras(dit)] == [first]
    assert pipe.load_lora(second, strength=0.3).path == second
    with_loras = pipe.generate("a cat", seed=1, progress=False).frames
    pipe.set_lora_strength(second, 0.0)  # as if only the first LoRA were attached
    only_first = Pipeline.from_pretrained(pipeline_models["t2v"], device="cpu", dtype=torch.float32,
                                          lora_configs=[{"path": first, "strength": 0.5}], lora_dynamic_apply=True,
                                          **SMALL)
    assert (pipe.generate("a cat", seed=1, progress=False).frames
            == only_first.generate("a cat", seed=1, progress=False).frames).all()
    with pytest.raises(ValueError, match="no LoRA attached at run time"):
        pipe.set_lora_strength(tmp_path / "other.safetensors", 1.0)
    pipe.unload_loras()
    assert_only_changed(dit, before, {})
    assert lora.attached_loras(dit) == []
    base_frames = pipe.generate("a cat", seed=1, progress=False).frames
    assert not (with_loras == base_frames).all()


def test_pipeline_routes_loras_to_wan22_experts(pipeline_models, tmp_path):
    from x2v.pipelines.wan import Pipeline

    root = pipeline_models["moe_t2v"]
    high_base = pristine(x2v.load_dit(root, expert=HIGH, dtype=torch.float32))
    low_base = pristine(x2v.load_dit(root, expert=LOW, dtype=torch.float32))
    path = write_pairs(tmp_path / "a.safetensors", random_pairs(x2v.load_dit(root, expert=HIGH), bases=BASES[:1]),
                       lambda b: f"diffusion_model.{b}", ".lora_up.weight", ".lora_down.weight")
    pipe = Pipeline.from_pretrained(root, device="cpu", dtype=torch.float32,
                                    lora_configs=[{"path": path, "name": HIGH}], lora_dynamic_apply=True, **SMALL)
    assert [r.path for r in lora.attached_loras(pipe.dits[HIGH])] == [path]
    assert lora.attached_loras(pipe.dits[LOW]) == []
    with pytest.raises(ValueError, match='needs "name"'):
        pipe.load_lora(path)
    assert pipe.load_lora(path, name=LOW, strength=2.0).name == LOW
    pipe.unload_loras()
    assert_only_changed(pipe.dits[HIGH], high_base, {})
    assert_only_changed(pipe.dits[LOW], low_base, {})
