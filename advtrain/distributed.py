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

BatchNorm synchronised across ranks (``sync_batchnorm``): training-mode statistics over the whole
global batch. On CUDA this is torch's :class:`~torch.nn.SyncBatchNorm`; it does not run on CPUs,
where :class:`AllRanksBatchNorm` (two differentiable all-reduces per layer) takes its place.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


def shutdown() -> None:
    """Leave the process group cleanly once every rank is done (a rank that exits with the group
    still open can abort at exit: gloo's threads are still joinable)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_rank() -> int:
    """This process's index on its machine (for ``cuda:<local rank>``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device) -> torch.device:
    """This process's device under torchrun: ``cuda:<local rank>`` (made current) for CUDA."""
    if env_world_size() > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def sum_gradients(model: nn.Module) -> None:
    """Replace each gradient by its sum over the ranks (one all-reduce of a flat buffer).

    Each rank has back-propagated its share of the batch's mean loss (its own mean weighted by
    its share of the rows), so the sum is the gradient of the whole batch's mean loss.
    """
    grads: list[Tensor] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # a rank with no rows (or an unused parameter) still adds its zeros
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
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


def gathered_objects(item: object) -> list[object]:
    """Every rank's ``item`` (picklable; tensors on the CPU), in rank order, on every rank."""
    items: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(items, item)
    return items


class _SumOverRanks(torch.autograd.Function):
    """A tensor summed over the ranks, differentiably: the gradient of a sum over ranks is the
    sum over ranks of the gradients (torch's own ``torch.distributed.nn`` version is deprecated)."""

    @staticmethod
    def forward(ctx: object, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class AllRanksBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (Ioffe & Szegedy 2015) whose training statistics are the whole global batch's,
    over every rank, for backends torch's ``SyncBatchNorm`` does not support (gloo on CPUs).

    Mean and biased variance come from two all-reduces of per-channel sums (differentiable, so
    the backward pass sees the global statistics too); the running estimates are updated with the
    unbiased variance, as :class:`torch.nn.BatchNorm2d` does. Outside training, or in one process,
    it is plain BatchNorm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        count = torch.full((1,), x.numel() / max(channels, 1), dtype=x.dtype, device=x.device)
        sums = _SumOverRanks.apply(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:channels] / n
        centred = x - mean.reshape(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        tracked = self.num_batches_tracked
        if (
            self.track_running_stats
            and self.running_mean is not None
            and self.running_var is not None
            and tracked is not None
        ):
            with torch.no_grad():
                tracked.add_(1)
                factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), factor)
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm layer computing its statistics over all ranks (same
    parameter and buffer names, so checkpoints load into the plain model)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, AllRanksBatchNorm
    ):
        synced = AllRanksBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced.to(next(iter(module.state_dict().values()), torch.zeros(())).device)
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module
