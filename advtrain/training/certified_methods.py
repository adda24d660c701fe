"""Training for verified robustness: IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020).

Both minimise ``kappa * CE(z(x), y) + (1 - kappa) * CE(-m, y)``, where ``m`` holds lower bounds of
the margins ``z_y - z_c`` over the threat model (0 for ``c = y``): ``-m`` are the worst-case
logits of Gowal et al. (their ``z_hat``), so the second term is an upper bound on the robust
cross-entropy. ``kappa`` moves linearly from ``kappa_start`` to ``kappa_end`` as eps ramps up
(the trainer's ``warmup_epochs``; progress = current eps / target eps, as in Zhang et al.'s
reference code), and stays at ``kappa_end`` once eps is reached.

- ``ibp``: ``m`` from interval bound propagation. Gowal et al., "On the effectiveness of interval
  bound propagation for training verifiably robust models" (2018): ``kappa`` 1 -> 0.5.
- ``crown-ibp``: ``m = beta * m_CROWN-IBP + (1 - beta) * m_IBP``, CROWN's backward bound over IBP's
  intermediate bounds mixed with IBP's, ``beta`` 1 -> 0 over the ramp. Zhang et al., "Towards
  stable and efficient training of verifiably robust neural networks" (ICLR 2020): ``beta``
  1 -> 0 as in the paper; ``kappa`` 1 -> 0, one of the two schedules the paper reports for
  CROWN-IBP (its released MNIST configurations train on the bound term alone, ``kappa`` 0 -> 0:
  ``kappa_start=0``). Once ``beta`` is 0 the CROWN pass is skipped.

The paper trains at a larger eps than it tests (MNIST: 0.2 for a test eps of 0.1, 0.4 for 0.3 and
0.4); here the training eps is the run's eps, and verification (``advtrain.certify.verify``)
takes its own threat model. The logits returned are the clean ones. The networks are those
bound propagation supports (:mod:`advtrain.certify.network`); a BatchNorm or Dropout layer,
which would run in training mode, is refused. ``steps`` and ``step_size`` are accepted and
ignored (no attack runs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..certify import training_margins
from ..errors import AdvtrainError
from ..threat import ThreatModel
from ..util import check_finite, check_positive_int
from .method import Method
from .methods import method

__all__ = ["CROWNIBPTraining", "IBPTraining"]


def _fraction(name: str, value: float) -> float:
    checked = check_finite(name, value)
    if checked > 1:
        raise AdvtrainError(f"{name} must lie in [0, 1], got {value!r}")
    return checked


def _check_no_batch_statistics(model: nn.Module) -> None:
    """A one-line error for a BatchNorm or Dropout layer in training mode: its output depends on
    the batch or on chance, which the bounds (running statistics, no dropout) do not cover."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) and module.training:
            raise AdvtrainError(
                f"certified training (ibp, crown-ibp) needs a network without BatchNorm or "
                f"Dropout in training mode; layer {name!r} is a {type(module).__name__}"
            )


class _BoundTraining(Method):
    """The shared loss; subclasses set whether (and how much) CROWN-IBP enters."""

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        kappa_start: float = 1.0,
        kappa_end: float = 0.5,
    ) -> None:
        super().__init__(threat)
        check_positive_int("steps", steps)
        if step_size is not None:
            check_finite("step_size", step_size)
        self.kappa_start = _fraction("kappa_start", kappa_start)
        self.kappa_end = _fraction("kappa_end", kappa_end)
        self.target_eps = threat.eps

    @property
    def progress(self) -> float:
        """How far eps has ramped: current eps / target eps, in [0, 1] (1 at a target of 0)."""
        if self.target_eps <= 0:
            return 1.0
        return min(1.0, max(0.0, self.eps / self.target_eps))

    @property
    def kappa(self) -> float:
        """The weight of the clean cross-entropy now."""
        return self.kappa_start + (self.kappa_end - self.kappa_start) * self.progress

    @property
    def beta(self) -> float:
        """The weight of CROWN-IBP's bound in the mix now (0: IBP alone)."""
        return 0.0

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        clean = F.cross_entropy(logits, y)
        kappa, beta = self.kappa, self.beta
        if kappa >= 1:
            return clean, logits
        _check_no_batch_statistics(model)
        ibp, crown = training_margins(model, x, y, self.threat, crown=beta > 0)
        margins = ibp if crown is None else beta * crown + (1 - beta) * ibp
        robust = F.cross_entropy(-margins, y)
        return kappa * clean + (1 - kappa) * robust, logits


@method("ibp")
class IBPTraining(_BoundTraining):
    """IBP training (Gowal et al. 2018); see the module docstring. Options: ``kappa_start``
    (1.0), ``kappa_end`` (0.5)."""


@method("crown-ibp")
class CROWNIBPTraining(_BoundTraining):
    """CROWN-IBP training (Zhang et al., ICLR 2020); see the module docstring. Options:
    ``kappa_start`` (1.0), ``kappa_end`` (0.0), ``beta_start`` (1.0), ``beta_end`` (0.0)."""

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        kappa_start: float = 1.0,
        kappa_end: float = 0.0,
        beta_start: float = 1.0,
        beta_end: float = 0.0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            step_size=step_size,
            kappa_start=kappa_start,
            kappa_end=kappa_end,
        )
        self.beta_start = _fraction("beta_start", beta_start)
        self.beta_end = _fraction("beta_end", beta_end)

    @property
    def beta(self) -> float:
        return self.beta_start + (self.beta_end - self.beta_start) * self.progress
