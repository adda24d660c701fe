"""A synthetic, strongly imbalanced card-fraud table (about 2% fraud) with immutable features.

The rows come from :func:`sklearn.datasets.make_classification` with a fixed seed, so the table
is the same everywhere; only the train/val/test split depends on the caller's seed. The feature
names are labels for a realistic setting, not a claim about the synthetic values.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import make_classification

from .base import Dataset, LoadRequest
from .tabular import tabular_dataset

#: Default linf radius for ``fraud`` (features min-max scaled to [0, 1]).
FRAUD_EPS = 0.05
#: Seed of the generator; independent of the split seed so every split sees the same table.
FRAUD_SEED = 20_240_601
FRAUD_ROWS = 20_000
FRAUD_WEIGHTS = (0.98, 0.02)

# Column order follows make_classification(shuffle=False): informative, redundant, then noise.
_INFORMATIVE = (
    "amount",
    "merchant_risk",
    "hour_of_day",
    "distance_from_home_km",
    "customer_age",
    "transactions_last_24h",
)
_REDUNDANT = ("amount_to_average_ratio", "velocity_score")
_NOISE = (
    "account_age_days",
    "country_code",
    "credit_limit",
    "device_trust_score",
    "minutes_since_last_login",
    "failed_pin_attempts",
    "merchant_category",
    "items_in_basket",
)
FRAUD_FEATURES: tuple[str, ...] = _INFORMATIVE + _REDUNDANT + _NOISE
#: Features a fraudster cannot change for a given card holder.
FRAUD_IMMUTABLE: tuple[str, ...] = (
    "customer_age",
    "account_age_days",
    "country_code",
    "credit_limit",
)


def fraud_table() -> tuple[np.ndarray, np.ndarray]:
    """The full synthetic table ``(x, y)``: float64 features and int64 labels (1 = fraud)."""
    x, y = make_classification(
        n_samples=FRAUD_ROWS,
        n_features=len(FRAUD_FEATURES),
        n_informative=len(_INFORMATIVE),
        n_redundant=len(_REDUNDANT),
        n_repeated=0,
        n_classes=2,
        n_clusters_per_class=2,
        weights=list(FRAUD_WEIGHTS),
        flip_y=0.002,
        class_sep=1.0,
        shuffle=False,
        random_state=FRAUD_SEED,
    )
    # shuffle=False also leaves the rows sorted by class; mix them with the same fixed seed.
    order = np.random.default_rng(FRAUD_SEED).permutation(len(y))
    return x[order], y[order].astype(np.int64)


def load_fraud_dataset(request: LoadRequest) -> Dataset:
    """The synthetic fraud set, split stratified and min-max scaled from its training split."""
    x, y = fraud_table()
    mutable = np.array([name not in FRAUD_IMMUTABLE for name in FRAUD_FEATURES])
    return tabular_dataset(
        x,
        y,
        request,
        name="fraud",
        classes=("legit", "fraud"),
        feature_names=FRAUD_FEATURES,
        default_eps=FRAUD_EPS,
        positive_class=1,
        mutable=mutable,
    )
