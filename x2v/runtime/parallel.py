"""Many processes, one video: the layout of a ``torchrun`` job and the exchanges the pipeline makes over it.

One process per GPU (NCCL), or per CPU process group (gloo). The config's ``parallel`` block (LightX2V's keys) says
how the ranks share the work: ``world = cfg_p_size x seq_p_size``. Ranks ``c * S ... c * S + S - 1`` run CFG branch
``c`` (0: conditional, 1: unconditional) and split its video tokens between them (sequence parallel, see
``x2v.ops.sequence_parallel``); with ``fsdp`` every DiT block's weights are sharded over all ranks (torch FSDP2).

Rank 0 alone runs the text and image encoders and the VAE encode, and hands the results, with the initial noise, to
every rank: all ranks then hold the same latents after every step. The decode runs on rank 0 (``vae_parallel``
false) or in tiles spread over the ranks; every rank ends with the same video, rank 0 alone writes it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from x2v.errors import ConfigError
from x2v.ops.sequence_parallel import ULYSSES, SequenceParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelConfig:
    """The ``parallel`` block, checked (``x2v.pipelines.settings``)."""

    seq_size: int = 1  # seq_p_size: ranks that split the video tokens
    seq_attention: str = ULYSSES  # seq_p_attn_type: "ulysses" or "ring"
    cfg_size: int = 1  # cfg_p_size: 2 runs the conditional and unconditional passes on different ranks
    vae_parallel: bool = False  # decode use_tiling_vae's tiles on all ranks (else on rank 0)
    fsdp: bool = False  # shard the DiT's weights over all ranks (FSDP2, per block)
    timeout_s: float = 1800.0  # a collective that waits longer ends the job (a rank that died, a hang)

    @property
    def world_size(self) -> int:
        return self.seq_size * self.cfg_size

    def describe(self) -> str:
        seq = f"{self.seq_attention} {self.seq_size}" if self.seq_size > 1 else "no sequence parallel"
        return (f"{self.world_size} ranks = CFG {self.cfg_size} x {seq}, FSDP {'on' if self.fsdp else 'off'}, "
                f"VAE decode {'on all ranks' if self.vae_parallel else 'on rank 0'}")


def launched_world_size() -> int:
    """Processes in this job: the process group's, else torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def check_world(config: ParallelConfig, world: int) -> None:
    """The job must have exactly the ranks the ``parallel`` block asks for."""
    if world == config.world_size:
        return
    asked = f"parallel asks for cfg_p_size {config.cfg_size} x seq_p_size {config.seq_size} = {config.world_size}"
    if world == 1:
        raise ConfigError(f"{asked} processes, but this is one process: launch it with torchrun --nproc_per_node "
                          f"{config.world_size} (x2v generate or -m x2v.infer), or drop the parallel block")
    raise ConfigError(f"{asked} processes, but the job has {world} (torchrun --nproc_per_node): set seq_p_size and "
                      f"cfg_p_size so that their product is {world}, or launch {config.world_size} processes")


def check_heads(config: ParallelConfig, heads: int, source: str) -> None:
    """Ulysses splits the attention heads over the sequence-parallel ranks."""
    if config.seq_size > 1 and config.seq_attention == ULYSSES and heads % config.seq_size:
        divisors = [n for n in range(2, heads + 1) if heads % n == 0][:4]
        raise ConfigError(f"{source}: the model has {heads} attention heads, which Ulysses cannot split over "
                          f"seq_p_size {config.seq_size}: use seq_p_attn_type \"ring\", or a seq_p_size that divides "
                          f"{heads} ({', '.join(map(str, divisors))}, ...)")


@dataclass
class Layout:
    """This process's place in the job, and the collectives the pipeline needs."""

    config: ParallelConfig
    rank: int
    device: torch.device
    seq_group: dist.ProcessGroup
    cfg_group: dist.ProcessGroup

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cfg_rank(self) -> int:
        """0: this rank runs the conditional pass; 1: the unconditional one."""
        return self.rank // self.config.seq_size

    def describe(self) -> str:
        return f"x2v parallel: {self.config.describe()}, {dist.get_backend()} on {self.device.type}"

    def share(self, values: dict | None) -> dict:
        """Rank 0's ``values`` (tensors and plain Python values) on every rank, tensors on this rank's device."""
        header = [None]
        if self.main:
            header = [{key: ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", v)
                       for key, v in values.items()}]
        dist.broadcast_object_list(header, src=0, device=self.comm_device)
        shared = {}
        for key, (kind, *spec) in header[0].items():
            if kind == "value":
                shared[key] = spec[0]
                continue
            shape, dtype = spec
            tensor = values[key].to(self.device).contiguous() if self.main else torch.empty(shape, dtype=dtype,
                                                                                            device=self.device)
            dist.broadcast(tensor, src=0)
            shared[key] = tensor
        return shared

    def cfg_pair(self, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's pass (conditional or unconditional) and the other CFG rank's: ``(cond, uncond)``."""
        parts = [torch.empty_like(velocity) for _ in range(self.config.cfg_size)]
        dist.all_gather(parts, velocity.contiguous(), group=self.cfg_group)
        return parts[0], parts[1]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``tensor``, on every rank (in place)."""
        dist.all_reduce(tensor)
        return tensor

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def parallelize(self, dit: nn.Module) -> nn.Module:
        """Split ``dit``'s video tokens over the sequence-parallel group; with ``fsdp``, shard its weights (block by
        block: a block is gathered just before it runs and freed after)."""
        if self.config.seq_size > 1:
            dit.sequence_parallel = SequenceParallel(self.seq_group, self.config.seq_attention)
        if self.config.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.config.world_size,))
            for name in dit.OFFLOAD_BLOCKS:
                for block in getattr(dit, name, ()):
                    fully_shard(block, mesh=mesh)  # moves one block at a time to the device, then shards it
            fully_shard(dit, mesh=mesh)
            # FSDP keeps the root's own weights (embeddings, head) gathered after a forward, for a backward that
            # inference never runs: shard them again.
            dit.register_forward_hook(lambda module, args, output: module.reshard())
        return dit


def start(config: ParallelConfig, device: torch.device) -> Layout | None:
    """Join the job (``torchrun`` sets the environment) and build its groups; None for a single process. The world
    size is checked before anything else happens."""
    world = launched_world_size()
    check_world(config, world)
    if world == 1:
        if config.fsdp:
            log.warning("parallel.fsdp: one process, nothing to shard; the weights stay whole")
        return None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=config.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    rank, seq = dist.get_rank(), config.seq_size
    seq_groups = [dist.new_group(list(range(c * seq, (c + 1) * seq))) for c in range(config.cfg_size)]
    cfg_groups = [dist.new_group(list(range(s, world, seq))) for s in range(seq)]  # every rank makes every group
    return Layout(config, rank, device, seq_groups[rank // seq], cfg_groups[rank % seq])
