"""Transfer from a distilled surrogate: an automatic black-box check of the white-box attacks.

Athalye, Carlini & Wagner (ICML 2018) and Carlini et al. ("On evaluating adversarial
robustness", 2019): when adversarial examples crafted on a surrogate model break points that the
white-box attacks could not, the white-box gradients are masked. Pintor et al. ("Indicators of
attack failure", NeurIPS 2022) list the failed transfer among their indicators. No surrogate is
asked of the user and no data besides the evaluation points: :func:`distil_surrogate` trains a
small model on the model's own softened predictions (Hinton, Vinyals & Dean 2015, "Distilling
the knowledge in a neural network") at the points and at random copies of them inside the
threat model, and at steps along the surrogate's gradient sign (the Jacobian-based augmentation
of Papernot et al. 2017, "Practical black-box attacks against machine learning"), which is how
it learns the model's local behaviour. :func:`surrogate_transfer` crafts on it and judges on the
model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD, Transfer
from ..attacks.gradient import input_gradient
from ..errors import AdvtrainError
from ..models.small import digits_cnn, mlp
from ..threat import ThreatModel
from ..util import check_positive_int
from .findings import VERDICT, Check, CheckName
from .shards import seeded

Judge = Callable[[Tensor], Tensor]

__all__ = ["DistilledSurrogate", "distil_surrogate", "surrogate_transfer"]


@dataclass
class DistilledSurrogate:
    """A surrogate and what its distillation cost: ``queries`` inputs passed through the model,
    and ``agreement``, the share of the training points on which it predicts the model's
    class."""

    model: nn.Module
    queries: int
    agreement: float


def distil_surrogate(
    model: nn.Module,
    x: Tensor,
    threat: ThreatModel,
    seed: int,
    *,
    copies: int = 8,
    jacobian_rounds: int = 1,
    temperature: float = 4.0,
    epochs: int = 20,
    lr: float = 3e-3,
    batch_size: int = 128,
) -> DistilledSurrogate:
    """A small model trained to imitate ``model`` on ``x`` and around it, from its outputs only.

    The surrogate is :func:`~advtrain.models.small.digits_cnn` for ``(C, H, W)`` inputs (its spatial
    size pooled to at most 8x8 first) and :func:`~advtrain.models.small.mlp` on the flattened input
    otherwise. Its training set: the points, ``copies`` (default 8) random copies of each drawn
    uniformly from the threat model (ball, bounds and mask), and, after each of
    ``jacobian_rounds`` (default 1) fits, one step of ``eps`` per copy along the sign of the
    surrogate's gradient (Papernot et al. 2017), projected into the threat model. The targets are
    the model's logits softened at ``temperature`` (default 4; Hinton et al. 2015), fit by the
    KL divergence times the squared temperature, with Adam (``lr`` 3e-3, ``epochs`` 20 passes per
    fit, batches of ``batch_size`` 128). Everything is seeded with ``seed``. ``queries`` counts
    the inputs the model was asked about.
    """
    for name, value in (("copies", copies), ("epochs", epochs), ("batch_size", batch_size)):
        check_positive_int(name, value)
    if jacobian_rounds < 0:
        raise AdvtrainError(f"jacobian_rounds must be >= 0, got {jacobian_rounds}")
    if not temperature > 0:
        raise AdvtrainError(f"temperature must be > 0, got {temperature}")
    if not len(x):
        raise AdvtrainError("distil_surrogate needs at least one point")
    if not threat.bounded:
        raise AdvtrainError("distil_surrogate needs a finite eps: its copies fill the eps-ball")
    x = x.detach()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    inputs = torch.cat([x] + [threat.random_start(x, generator) for _ in range(copies)])
    targets = _soft_targets(model, inputs, temperature, batch_size)
    n_classes = targets.shape[1]
    with seeded(seed, x.device):
        surrogate = _architecture(tuple(x.shape[1:]), n_classes).to(x.device, x.dtype)
    shuffle = torch.Generator().manual_seed(seed)
    _fit(surrogate, inputs, targets, temperature, epochs, lr, batch_size, shuffle)
    origin = x.repeat(copies + 1, *([1] * (x.dim() - 1)))  # the clean point of each input
    n = len(x)
    for _ in range(jacobian_rounds):
        stepped = _jacobian_step(surrogate, inputs[n:], targets[n:], threat, origin[n:])
        inputs = torch.cat([inputs, stepped])
        targets = torch.cat([targets, _soft_targets(model, stepped, temperature, batch_size)])
        origin = torch.cat([origin, origin[n:]])
        _fit(surrogate, inputs, targets, temperature, epochs, lr, batch_size, shuffle)
    surrogate.eval()
    with torch.no_grad():
        agree = surrogate(x).argmax(dim=1) == targets[: len(x)].argmax(dim=1)
    return DistilledSurrogate(surrogate, len(inputs), float(agree.float().mean()))


def _architecture(shape: tuple[int, ...], n_classes: int) -> nn.Module:
    if len(shape) == 3:
        channels, height, width = shape
        pooled = (min(height, 8), min(width, 8))
        body = digits_cnn((channels, *pooled), n_classes)
        return nn.Sequential(nn.AdaptiveAvgPool2d(pooled), body)
    features = 1
    for size in shape:
        features *= size
    return nn.Sequential(nn.Flatten(), mlp((features,), n_classes))


def _soft_targets(model: nn.Module, x: Tensor, temperature: float, batch_size: int) -> Tensor:
    """The model's softmax at ``temperature``, asked in batches (NaN or infinite logits are
    replaced by finite numbers)."""
    with torch.no_grad():
        logits = torch.cat([model(chunk).float() for chunk in x.split(batch_size)])
    return torch.softmax(torch.nan_to_num(logits) / temperature, dim=1).to(x.dtype)


def _fit(
    surrogate: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    temperature: float,
    epochs: int,
    lr: float,
    batch_size: int,
    shuffle: torch.Generator,
) -> None:
    optimizer = torch.optim.Adam(surrogate.parameters(), lr=lr)
    surrogate.train()
    with torch.enable_grad():
        for _ in range(epochs):
            for index in torch.randperm(len(inputs), generator=shuffle).split(batch_size):
                index = index.to(inputs.device)
                log_p = F.log_softmax(surrogate(inputs[index]) / temperature, dim=1)
                loss = F.kl_div(log_p, targets[index], reduction="batchmean") * temperature**2
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    surrogate.eval()


def _jacobian_step(
    surrogate: nn.Module, x: Tensor, targets: Tensor, threat: ThreatModel, origin: Tensor
) -> Tensor:
    """One step of ``eps`` from each copy along the gradient of the surrogate's loss on the
    model's class, projected into the threat model around its clean point."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(surrogate(x), targets.argmax(dim=1), reduction="sum")
    gradient = input_gradient(loss, x)
    step = threat.ascent_direction(gradient, x.detach()) * threat.eps
    return threat.project(x.detach() + step, origin).detach()


def surrogate_transfer(
    model: nn.Module,
    judge: Judge,
    threat: ThreatModel,
    x: Tensor,
    y: Tensor,
    survived: Tensor,
    seed: int,
    *,
    steps: int = 100,
) -> Check:
    """Examples crafted on a surrogate distilled from ``model`` on ``x`` (:func:`distil_surrogate`)
    with PGD-``steps`` (default 100) and cross-entropy, every step taken, projected into the
    threat model and judged by ``judge``: how many of the points that ``survived`` (one bool per
    point) every white-box attack do they break? A verdict when at least 3 of the survivors and
    at least 5% of them fall, the rule of the black-box check."""
    survived = survived.to(torch.bool).cpu()
    if len(survived) != len(x):
        raise AdvtrainError(f"survived has {len(survived)} entries for {len(x)} points")
    distilled = distil_surrogate(model, x, threat, seed)
    crafting = PGD(threat, steps=steps, loss="ce", early_stop=False, seed=seed)
    attack = Transfer(distilled.model, threat, attack=crafting, seed=seed)
    broken = (judge(attack(model, x, y)) != y).cpu()
    survivors = int(survived.sum())
    fell = int((broken & survived).sum())
    share = fell / survivors if survivors else 0.0
    fired = fell >= 3 and share >= 0.05
    return Check(
        CheckName.TRANSFER,
        fired,
        f"a surrogate distilled from the model's own predictions on {len(x)} points "
        f"({distilled.queries} queries) transfers to {fell} of the {survivors} points that "
        f"survived every gradient attack ({share:.1%})",
        VERDICT,
        {
            "points": len(x),
            "queries": distilled.queries,
            "survivors": survivors,
            "broken": fell,
            "agreement": distilled.agreement,
            "transfer_success": float(broken.float().mean()),
        },
    )
