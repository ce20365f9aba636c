"""Data-parallel training across processes: the process group, the sampler that
splits the data, and the few collectives the training loop needs.

One process per device. ``torchrun --nproc_per_node=K -m runner train ...`` sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a SLURM job started by
hydra-submitit-launcher with several tasks gets them from submitit. Without them
a run is one plain process and nothing here costs anything.

``batch_size`` stays the global batch: each of the K processes takes batch_size/K
examples, and the K shares of a step are together the batch a single process
would take at that step (see :class:`ShardSampler`). Gradients are averaged by
DistributedDataParallel, so one step of K processes equals one step of a single
process on the combined batch (without BatchNorm, whose statistics stay per process).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import env_world_size


@dataclass
class Dist:
    """This process's place in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False   # we started the process group, so we close it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes outputs."""
        return self.rank == 0

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model to train with: DistributedDataParallel when there are several processes."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                       else None)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums over all processes (the values themselves in one process)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
            self.owns_group = False


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group the launcher describes: gloo on CPU, nccl on GPU.
    Returns this process's Dist and its device (cuda:LOCAL_RANK on GPUs)."""
    world = env_world_size()
    if world <= 1:
        return Dist(), device
    if "RANK" not in os.environ:   # submitit: export the env:// variables from SLURM's
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not torch_dist.is_initialized()
    if owns:
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                      rank=rank, world_size=world)
    return Dist(rank, world, local, owns), device


# ------------------------------------------------------------------- data
class ShardSampler(Sampler[int]):
    """This process's share of an epoch, in an order that depends only on (seed, epoch).

    The epoch's order is a permutation drawn from ``seed + epoch`` (``shuffle``) or
    0..n-1; process r of K takes positions r, r+K, r+2K, ... so that, with a
    per-process batch b, the K batches of step k hold exactly positions
    [kbK, (k+1)bK) of the order: the batch one process with batch bK takes. The
    order is padded by repeating its start to a multiple of K (``pad``), as
    DistributedSampler does, so every process takes the same number of steps.
    ``set_epoch(epoch, skip)`` chooses the epoch and drops this process's first
    ``skip`` examples (resuming within an epoch).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order += (order * (extra // max(self.n, 1) + 1))[:extra]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        per_rank = (-(-self.n // self.world_size) if self.pad
                    else len(range(self.rank, self.n, self.world_size)))
        return max(per_rank - self.skip, 0)


def loader(dataset: Dataset, batch_size: int, dist: Dist, *, shuffle: bool, seed: int,
           num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over this process's share of ``dataset`` (``batch_size`` per process).

    It draws nothing from the global RNG (its own generator seeds the workers), so
    a run resumed from a checkpoint sees the same random numbers as one that was
    never stopped."""
    sampler = ShardSampler(len(dataset), shuffle=shuffle, seed=seed, rank=dist.rank,
                           world_size=dist.world_size, pad=shuffle)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Point ``loader`` (from :func:`loader`) at ``epoch``, after its first ``skip_batches``."""
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
    loader.generator.manual_seed(loader.sampler.seed + epoch)


def max_param_divergence(model: torch.nn.Module, dist: Dist) -> float:
    """Largest difference between a parameter here and on rank 0 (0.0 in sync)."""
    if not dist.enabled:
        return 0.0
    worst = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        theirs = p.detach().clone()
        torch_dist.broadcast(theirs, src=0)
        worst = torch.maximum(worst, (theirs - p.detach()).abs().max().double().cpu())
    device = next(model.parameters()).device
    worst = worst.to(device)
    torch_dist.all_reduce(worst, op=torch_dist.ReduceOp.MAX)
    return float(worst)
