"""Weights that wait in host memory and visit the compute device only while they are used.

LightX2V's offload keys (docs/config.md, Offload), with LightX2V's meaning:

* ``cpu_offload`` + ``offload_granularity``:

  * ``"block"`` (default): the DiT's blocks stay in host memory (pinned on CUDA). While block i computes, block
    i+1 is copied into the second of two reusable device buffers on a side CUDA stream; events order each copy
    after the compute that last read its buffer, and each compute after its copy. The non-block weights
    (embeddings, time projection, head) are on the device for the duration of each DiT call. Device memory:
    the non-block weights, two blocks, the activations.
  * ``"phase"``: the same with the phases of a block as the unit (self-attention with the block's modulation,
    cross-attention with its norm, feed-forward): about one block on the device.
  * ``"model"``: the whole DiT moves to the device for the denoising loop and leaves after it. A Wan2.2 expert
    swap is copied during the step before the switch when the device holds both experts (``has_room``), else at
    the switch.

* ``lazy_load`` (needs ``cpu_offload``, block or phase): the blocks are never read into host memory as a whole.
  They stay views of the memory-mapped checkpoint (a block-split folder, or any safetensors file read by key);
  each unit is read from disk just before it is needed (``num_disk_workers`` threads), staged in a pinned buffer
  (two per layout: current and next), copied to the device, and its file pages are handed back.
* ``t5_cpu_offload`` / ``clip_cpu_offload`` (default: ``cpu_offload``): the encoder waits in host memory and its
  blocks stream through the device during each call, as the DiT's do; ``vae_cpu_offload``: the whole VAE is
  copied to the device for each encode / decode. They all compute on the device, as in LightX2V; nothing stays
  there between calls.

Moving a unit is a swap, not a ``.to()``: its modules' parameters and buffers (8-bit weights with their scales,
LoRA branches) point at device copies while the unit runs and back at the untouched host tensors afterwards.
Nothing is copied back, and a model computes exactly what the resident model computes. On a CPU "device" the
same code runs (host-to-host copies, no streams), which is how the tests cover the scheduling.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from x2v.errors import ConfigError
from x2v.ops.quant_linear import QuantLinear
from x2v.runtime.pages import FileMappings, read_pages, release_pages

GRANULARITIES = ("block", "phase", "model")
EXPERT_MARGIN = 2 * 2**30  # bytes left for the running step's activations when the next expert is copied early


# --- settings --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OffloadConfig:
    """The offload keys of one pipeline (read and checked by ``x2v.pipelines.settings``)."""

    cpu_offload: bool = False
    granularity: str = "block"
    lazy_load: bool = False
    disk_workers: int = 4
    t5: bool = False
    clip: bool = False
    vae: bool = False

    def place(self, component: str, device: torch.device) -> torch.device:
        """Where ``component`` ("dit", "t5", "clip", "vae") is loaded: the host when it is offloaded."""
        offloaded = {"dit": self.cpu_offload, "t5": self.t5, "clip": self.clip, "vae": self.vae}[component]
        return torch.device("cpu") if offloaded else device


# --- units: the pieces that move together ------------------------------------------------------------------------

TensorRef = tuple[nn.Module, str]  # a parameter or buffer: (owning module, name)


def own_refs(module: nn.Module) -> list[TensorRef]:
    return [(module, name) for store in (module._parameters, module._buffers)
            for name, tensor in store.items() if tensor is not None]


def get_tensor(ref: TensorRef) -> torch.Tensor:
    module, name = ref
    return module._parameters[name] if name in module._parameters else module._buffers[name]


def put_tensor(ref: TensorRef, tensor: torch.Tensor) -> None:
    module, name = ref
    (module._parameters if name in module._parameters else module._buffers)[name] = tensor


@dataclass(eq=False)
class Unit:
    """A piece of a model that moves as a whole: a block, a phase, a model's non-block rest, or a whole model.
    ``modules`` are the modules whose own tensors it holds (walked again at every use: LoRA branches count)."""

    name: str
    modules: list[nn.Module]

    def refs(self) -> list[TensorRef]:
        return [ref for module in self.modules for ref in own_refs(module)]


Layout = tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, bool], ...]  # (shape, stride, dtype, param)


def layout_of(refs: list[TensorRef], tensors: list[torch.Tensor]) -> Layout:
    return tuple((tuple(t.shape), t.stride(), t.dtype, name in module._parameters)
                 for (module, name), t in zip(refs, tensors))


def unit_bytes(unit: Unit) -> int:
    return sum(get_tensor(ref).nbytes for ref in unit.refs())


def whole(name: str, model: nn.Module) -> Unit:
    return Unit(name, list(model.modules()))


def block_lists(model: nn.Module) -> tuple[str, ...]:
    """The block lists a model streams, as it declares them (``OFFLOAD_BLOCKS``: attribute names, in the order
    its forward runs them)."""
    lists = getattr(model, "OFFLOAD_BLOCKS", None)
    if lists is None:
        raise ValueError(f"{type(model).__name__} does not declare OFFLOAD_BLOCKS, so its blocks cannot be streamed")
    return lists


def block_units(model: nn.Module, lists: tuple[str, ...], granularity: str) -> list[Unit]:
    """The streamed units of ``model``'s block lists ``lists``, in execution order."""
    units = []
    for attr in lists:
        for i, block in enumerate(getattr(model, attr, ())):
            name = f"{attr}.{i}"
            units += phase_units(name, block) if granularity == "phase" else [whole(name, block)]
    return units


def phase_units(name: str, block: nn.Module) -> list[Unit]:
    """A block's phases as it declares them (``OFFLOAD_PHASES``: phase -> the children it uses, in running order;
    the block's own tensors go with the first)."""
    phases = getattr(block, "OFFLOAD_PHASES", {})
    children = dict(block.named_children())
    unknown = sorted(set(children) - {child for members in phases.values() for child in members})
    if unknown or not phases:
        raise ValueError(f"{name}: phase offload does not know the phase of {unknown or 'its children'}; use "
                         'offload_granularity "block"')
    units = []
    for i, (phase, members) in enumerate(phases.items()):
        modules = [block] if i == 0 else []
        modules += [m for child in members if child in children for m in children[child].modules()]
        units.append(Unit(f"{name}.{phase}", modules))
    return units


def rest_unit(model: nn.Module) -> Unit:
    """Everything of ``model`` outside its block lists."""
    streamed = {id(m) for attr in block_lists(model) for m in getattr(model, attr, nn.ModuleList()).modules()}
    return Unit("rest", [m for m in model.modules() if id(m) not in streamed])


# --- the mover -------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Slot:
    """Tensors laid out like one unit's tensors; ``held`` are what the modules hold while it is resident."""

    layout: Layout
    tensors: list[torch.Tensor]
    held: list[torch.Tensor]
    free: torch.cuda.Event | None = None  # recorded after the last compute that read it


def new_slot(layout: Layout, device: torch.device, pin: bool = False) -> Slot:
    with torch.inference_mode(False):  # slots outlive inference_mode blocks and are written in and out of them
        tensors = [torch.empty_strided(shape, stride, dtype=dtype, device=device, pin_memory=pin)
                   for shape, stride, dtype, _ in layout]
        held = [nn.Parameter(t, requires_grad=False) if param else t for t, (*_, param) in zip(tensors, layout)]
    return Slot(layout, tensors, held)


@dataclass(eq=False)
class Loaded:
    unit: Unit
    refs: list[TensorRef]
    hosts: list[torch.Tensor]  # what the modules held before: restored on release
    slot: Slot
    ready: Future  # -> the CUDA event that ends the copy (None on CPU)
    resident: bool = False


def done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


class Streamer:
    """Copies units into device slots ahead of use (``prefetch``), swaps them in (``enter``) and out (``release``).

    Slots of a layout passed to ``keep`` (one that recurs: the blocks) are kept for the next unit of that layout;
    others are freed on release. ``lazy``: host tensors are views of mapped checkpoint files, read by
    ``disk_workers`` threads and staged through pinned buffers, their pages handed back after the copy.
    ``trace``: a list that gets ``(event, unit name)`` for each "load" (copy issued), "enter" and "free".
    """

    def __init__(self, device: torch.device | str, *, lazy: bool = False, disk_workers: int = 4,
                 trace: list | None = None):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.lazy, self.trace = lazy, trace
        self.loaded: dict[Unit, Loaded] = {}
        self.pool: dict[Layout, list[Slot]] = {}
        self.kept: set[Layout] = set()
        self.staging: dict[Layout, list[Slot]] = {}
        if lazy:
            self.mappings = FileMappings()
            self.stager = ThreadPoolExecutor(1, thread_name_prefix="x2v-stage")  # one unit after the other
            self.readers = ThreadPoolExecutor(disk_workers, thread_name_prefix="x2v-disk")

    def note(self, event: str, unit: Unit) -> None:
        if self.trace is not None:
            self.trace.append((event, unit.name))

    def keep(self, layouts: set[Layout]) -> None:
        self.kept = layouts

    def prefetch(self, unit: Unit) -> None:
        """Start copying ``unit`` to the device (on the side stream; lazy: on the staging thread)."""
        if unit in self.loaded:
            return
        refs = unit.refs()
        hosts = [get_tensor(ref) for ref in refs]
        layout = layout_of(refs, hosts)
        slots = self.pool.get(layout)
        if slots:
            slot = slots.pop()
        else:
            slot = new_slot(layout, self.device)
            slot.free = self.computes_issued()  # fresh memory may be a freed slot that queued computes still read
        ready = self.stager.submit(self.stage, hosts, slot) if self.lazy else done(self.copy(hosts, slot))
        self.loaded[unit] = Loaded(unit, refs, hosts, slot, ready)
        self.note("load", unit)

    def copy(self, sources: list[torch.Tensor], slot: Slot) -> torch.cuda.Event | None:
        with torch.no_grad():
            if self.stream is None:
                for dst, src in zip(slot.tensors, sources):
                    dst.copy_(src)
                return None
            if slot.free is not None:
                self.stream.wait_event(slot.free)
            with torch.cuda.stream(self.stream):
                for dst, src in zip(slot.tensors, sources):
                    dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
            return event

    def stage(self, hosts: list[torch.Tensor], slot: Slot) -> torch.cuda.Event | None:
        """Lazy load (staging thread): read the unit's file pages in parallel, copy to the slot through a pinned
        buffer (CUDA), hand the pages back."""
        pages = [self.mappings.pages(t) for t in hosts]
        list(self.readers.map(read_pages, pages))
        if self.stream is None:
            event = self.copy(hosts, slot)
        else:
            staging = self.staging_buffer(slot.layout)
            if staging.free is not None:
                staging.free.synchronize()  # its previous copy to the device is done
            with torch.no_grad():
                for dst, src in zip(staging.tensors, hosts):
                    dst.copy_(src)
            event = staging.free = self.copy(staging.tensors, slot)
        for span in pages:
            release_pages(span)
        return event

    def staging_buffer(self, layout: Layout) -> Slot:
        """Two pinned host buffers per layout, used in turn (current and next unit)."""
        ring = self.staging.setdefault(layout, [])
        if len(ring) < 2:
            ring.append(new_slot(layout, torch.device("cpu"), pin=True))
            return ring[-1]
        ring.append(ring.pop(0))
        return ring[-1]

    def enter(self, unit: Unit) -> None:
        """Make ``unit`` resident: wait for its copy, point its modules at the device tensors."""
        self.prefetch(unit)
        loaded = self.loaded[unit]
        if loaded.resident:
            return
        event = loaded.ready.result()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for ref, tensor in zip(loaded.refs, loaded.slot.held):
            put_tensor(ref, tensor)
        loaded.resident = True
        self.note("enter", unit)

    def release(self, unit: Unit) -> None:
        """Point ``unit`` back at its host tensors; its slot is free once the computes issued so far are done."""
        loaded = self.loaded.pop(unit, None)
        if loaded is None:
            return
        event = loaded.ready.result()
        if loaded.resident:
            for ref, host in zip(loaded.refs, loaded.hosts):
                put_tensor(ref, host)
        elif event is not None:  # never used: its copy must end before the slot is reused or freed
            torch.cuda.current_stream(self.device).wait_event(event)
        slot = loaded.slot
        slot.free = self.computes_issued()
        if slot.layout in self.kept:
            self.pool.setdefault(slot.layout, []).append(slot)
        self.note("free", unit)

    def computes_issued(self) -> torch.cuda.Event | None:
        """An event after everything issued so far on the compute stream (None on CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def release_all(self, keep: tuple[Unit, ...] = ()) -> None:
        for unit in [u for u in self.loaded if u not in keep]:
            self.release(unit)

    def clear(self) -> None:
        """Release everything and free the kept slots (device memory back to the allocator)."""
        self.release_all()
        self.pool.clear()
        self.kept = set()


def pin_host_memory(model: nn.Module) -> None:
    """Host tensors to pinned memory, so copies to the GPU are asynchronous (the pages of a mapped file
    are handed back after their copy)."""
    mappings = FileMappings()
    with torch.no_grad():
        for module in model.modules():
            for ref in own_refs(module):
                tensor = get_tensor(ref)
                if tensor.device.type == "cpu" and not tensor.is_pinned():
                    pages = mappings.pages(tensor)
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.pin_memory()
                    else:
                        put_tensor(ref, tensor.pin_memory())
                    release_pages(pages)


# --- streaming a model's blocks during its forward ---------------------------------------------------------------


class BlockStreaming:
    """Runs ``model``'s forward with its blocks (or phases) streamed through ``streamer``.

    The instance replaces ``model.forward``. Each call moves the non-block rest in, prefetches the first unit,
    and hooks every module that holds a unit's tensors: the first call into a unit releases the previous one,
    starts copying the next one, then waits for its own copy. Hooks live only during the call.
    """

    def __init__(self, model: nn.Module, streamer: Streamer, granularity: str = "block"):
        self.model, self.streamer, self.granularity = model, streamer, granularity
        self.lists = block_lists(model)
        self.inner = model.forward
        self.current: Unit | None = None
        functools.update_wrapper(self, self.inner)
        model.forward = self

    def plan(self, kwargs: dict) -> tuple[Unit, list[Unit]]:
        # A model may run fewer lists for some calls (the DiT without a VACE context); it says which.
        running = getattr(self.model, "running_blocks", None)
        units = block_units(self.model, running(**kwargs) if running else self.lists, self.granularity)
        layouts = Counter(layout_of(refs, [get_tensor(r) for r in refs]) for refs in (u.refs() for u in units))
        self.streamer.keep({layout for layout, count in layouts.items() if count > 1})
        return rest_unit(self.model), units

    def __call__(self, *args, **kwargs):
        rest, units = self.plan(kwargs)
        hooks = [module.register_forward_pre_hook(functools.partial(self.reach, units, k, rest))
                 for k, unit in enumerate(units) for module in unit.modules if own_refs(module)]
        self.current = None
        try:
            self.streamer.prefetch(rest)
            if units:
                self.streamer.prefetch(units[0])  # copied while the embeddings compute
            self.streamer.enter(rest)
            return self.inner(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            self.streamer.clear()
            self.current = None

    def reach(self, units: list[Unit], k: int, rest: Unit, module: nn.Module, args: tuple) -> None:
        unit = units[k]
        if unit is self.current:
            return
        following = units[k + 1] if k + 1 < len(units) else None
        self.streamer.release_all(keep=(rest, unit, following))  # the previous unit (and any out-of-order one)
        if following is not None:
            self.streamer.prefetch(following)
        self.streamer.enter(unit)
        self.current = unit


def offload_calls(module: nn.Module, device: torch.device, methods: tuple[str, ...]) -> nn.Module:
    """``module`` (in host memory) copied whole to ``device`` for each call of ``methods``, and freed after."""
    streamer = Streamer(device)
    for method in methods:
        inner = getattr(module, method)

        @functools.wraps(inner)
        def run(*args, _inner=inner, **kwargs):
            unit = whole(type(module).__name__, module)
            streamer.enter(unit)
            try:
                return _inner(*args, **kwargs)
            finally:
                streamer.release(unit)

        setattr(module, method, run)  # the instance attribute shadows the method
    return module


def offload_encoders(components: dict, device: torch.device, config: OffloadConfig) -> None:
    """t5 / clip: blocks streamed during each call; vae: whole for each encode / decode. Loaded on the host."""
    for key, flag in (("t5", config.t5), ("clip", config.clip)):
        if flag and components.get(key) is not None:
            prepare_host(components[key], device)
            BlockStreaming(components[key], Streamer(device))
    if config.vae:
        prepare_host(components["vae"], device)
        offload_calls(components["vae"], device, ("encode", "decode"))


def prepare_host(model: nn.Module, device: torch.device) -> None:
    if device.type == "cuda":
        pin_host_memory(model)


# --- the DiTs of a pipeline --------------------------------------------------------------------------------------


def check_lazy(model: nn.Module) -> None:
    """lazy_load streams the checkpoint's bytes: each block linear weight must still be a view of the file (its
    dtype and quantization as stored). Pages read while loading are handed back."""
    mappings = FileMappings()
    for attr in block_lists(model):
        for name, module in getattr(model, attr, nn.ModuleList()).named_modules(prefix=attr):
            if isinstance(module, (nn.Linear, QuantLinear)) and mappings.pages(module.weight) is None:
                raise ConfigError(
                    f"lazy_load reads each block from the checkpoint as it runs, but {name}.weight was converted at "
                    f"load ({module.weight.dtype} is not how the file stores it). Convert the checkpoint to the "
                    "dtype / quantization you run, e.g. `x2v convert SRC DST --layout block-split --dtype bf16` "
                    "(or `--quantize fp8` with dit_quantized), or turn lazy_load off")
            for ref in own_refs(module):
                release_pages(mappings.pages(get_tensor(ref)))


def has_room(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` more fit on ``device`` next to a step's activations."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached >= nbytes + EXPERT_MARGIN


class DiTOffload:
    """Places a pipeline's DiT(s) for the denoising loop by ``OffloadConfig``; without ``cpu_offload`` it does
    nothing. ``activate(name)`` before a step runs expert ``name``; ``prefetch(name)`` names the next step's
    expert; ``denoising()`` wraps the loop and returns everything to the host after it."""

    def __init__(self, dits: dict[str, nn.Module], device: torch.device, config: OffloadConfig,
                 trace: list | None = None):
        self.dits, self.device, self.config = dits, torch.device(device), config
        self.streamer = None
        self.units: dict[str, Unit] = {}  # model granularity: each DiT whole
        if not config.cpu_offload:
            return
        self.streamer = Streamer(device, lazy=config.lazy_load, disk_workers=config.disk_workers, trace=trace)
        for dit in dits.values():
            if config.lazy_load:
                check_lazy(dit)
            else:
                prepare_host(dit, self.device)
            if config.granularity != "model":
                BlockStreaming(dit, self.streamer, config.granularity)

    @property
    def enabled(self) -> bool:
        return self.streamer is not None

    def unit(self, name: str) -> Unit:
        if name not in self.units:
            self.units[name] = whole(name, self.dits[name])
        return self.units[name]

    def activate(self, name: str) -> nn.Module:
        """The DiT of expert ``name``, ready to run (model granularity: on the device, the other one released)."""
        if self.config.granularity == "model":
            self.streamer.release_all(keep=(self.unit(name),))
            self.streamer.enter(self.unit(name))
        return self.dits[name]

    def prefetch(self, name: str) -> None:
        """Model granularity: start copying the next step's expert now, if the device holds both."""
        if self.enabled and self.config.granularity == "model":
            unit = self.unit(name)
            if unit not in self.streamer.loaded and has_room(self.device, unit_bytes(unit)):
                self.streamer.prefetch(unit)

    @contextmanager
    def denoising(self) -> Iterator[None]:
        try:
            yield
        finally:
            if self.enabled:
                self.streamer.clear()
                self.units.clear()  # walked again next time: LoRAs may change in between
