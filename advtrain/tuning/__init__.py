"""Choosing and keeping robustness: sweeps over training settings on Optuna, and a gate for CI.

- :func:`run_sweep` searches a :class:`SearchSpace` (:func:`load_space`, a TOML file) with
  Optuna's samplers, pruners and RDB storage; every trial is an ordinary run directory; the
  result (:class:`SweepResult`) holds the trials, the Pareto front of clean against robust
  validation accuracy (:func:`pareto_front`) and that front measured on the test split with an
  evaluation suite.
- :func:`gate` compares an evaluation report with a baseline measured under the same threat
  model and suite and returns a :class:`Verdict` (holds, or what regressed);
  :func:`read_report` reads a report JSON of any version; :func:`evaluate_like` re-measures a
  run directory as a baseline was measured.

Optuna (the ``tune`` extra) is imported only when a sweep runs.
"""

from .evaluate_front import evaluate_like
from .front import dominates, pareto_front
from .gate import Verdict, gate, masking_findings, read_report
from .space import Param, SearchSpace, load_space, parse_space
from .sweep import SweepResult, TrialSummary, run_sweep

__all__ = [
    "Param",
    "SearchSpace",
    "SweepResult",
    "TrialSummary",
    "Verdict",
    "dominates",
    "evaluate_like",
    "gate",
    "load_space",
    "masking_findings",
    "pareto_front",
    "parse_space",
    "read_report",
    "run_sweep",
]
