"""Data-parallel training over ``torch.distributed`` processes (``torchrun``).

Under ``torchrun --nproc_per_node N -m advtrain train ...`` (or ``advtrain train --nproc N``)
every process builds the same model and the same shuffled order of the training set; each global
batch is split over the ranks (rank ``r`` takes rows ``r, r + N, ...``, the split a
``DistributedSampler`` makes) and, after each backward pass, the gradients are summed over the
ranks with every rank's gradient weighted by its share of the batch, so each optimiser step sees
the gradient of the whole batch, as one process would. Backend ``nccl`` on GPUs, ``gloo`` on CPUs.

The gradients are reduced explicitly after the backward pass rather than through
``DistributedDataParallel``'s hooks: adversarial methods call the model several times per batch
(attack steps with frozen parameters, then clean and adversarial forwards trained together), which
the hooks' one-forward-one-backward contract does not allow.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def env_world_size() -> int:
    """The number of processes ``torchrun`` started (1 outside it)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def init_from_env(device_type: str) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes, once; returns ``(rank, world size)``."""
    if env_world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    """This process's index on its machine (for ``cuda:<local rank>``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def reduce_gradients(model: nn.Module, local: int, total: int) -> None:
    """Replace each gradient by the batch-weighted sum over ranks: ``sum_r n_r g_r / N``.

    ``local`` is this rank's number of samples in the batch and ``total`` the batch's. One
    all-reduce of a flat buffer holding every gradient.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a rank with no rows (or an unused parameter) still adds its zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * (local / total)
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_rank_zero(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's values, on every rank."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def barrier() -> None:
    """Wait for every rank."""
    dist.barrier()


def gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (CPU), in rank order, on every rank."""
    items: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(items, tensor.cpu())
    return [item for item in items if isinstance(item, torch.Tensor)]
