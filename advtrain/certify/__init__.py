"""Certified robustness: proven lower bounds beside the attacks' upper bounds.

- :mod:`.bounds` and :mod:`.crown`: interval bound propagation (Gowal et al. 2018) and CROWN
  (Zhang et al. 2018) for the networks they apply to; a point is verified when the lower bound of
  every logit margin ``z_y - z_c`` is positive over the whole threat model.
- :mod:`.smoothing`: randomized smoothing (Cohen, Rosenfeld & Kolter 2019) for any model; its
  certificates belong to the smoothed classifier, not to the model itself.
"""

# bound propagation (network.py, input_set.py, crown.py, bounds.py)
from .bounds import (
    BOUND_METHODS,
    Verification,
    interval_bounds,
    margin_lower_bounds,
    training_margins,
    verify,
)

# randomized smoothing (smoothing.py, smoothing_report.py)
from .smoothing import (
    ABSTAIN,
    Certificate,
    Smoothed,
    SmoothedPrediction,
    SmoothingSettings,
    clopper_pearson_lower,
    max_certifiable_radius,
)
from .smoothing_report import CertifiedAccuracy, certified_accuracy, write_certified_accuracy_curve

__all__ = [
    "ABSTAIN",
    "BOUND_METHODS",
    "Certificate",
    "CertifiedAccuracy",
    "Smoothed",
    "SmoothedPrediction",
    "SmoothingSettings",
    "Verification",
    "certified_accuracy",
    "clopper_pearson_lower",
    "interval_bounds",
    "margin_lower_bounds",
    "max_certifiable_radius",
    "training_margins",
    "verify",
    "write_certified_accuracy_curve",
]
