"""A generated card-transactions table (about 1.5% fraud) and its schema: the tabular example.

:func:`transactions_frame` draws the table from a fixed seed with NumPy only, so it is the same
everywhere (``examples/transactions.csv`` is its CSV, written by ``examples/make_transactions.py``).
It has every kind of column a fraud team's table has:

* continuous: ``amount``, ``avg_amount_30d``, ``credit_limit``, ``distance_km``;
* integer: ``customer_age``, ``account_age_days``, ``hour``, ``tx_count_1h``, ``tx_count_24h``,
  ``minutes_since_last_tx``;
* binary: ``card_present``, ``is_foreign``, ``new_device``;
* categorical: ``channel`` (app/pos/web), ``merchant_category``;
* immutable (the card holder's history, which a fraudster cannot rewrite): ``customer_age``,
  ``account_age_days``, ``credit_limit``, ``avg_amount_30d``;
* one-way columns: ``tx_count_1h`` and ``tx_count_24h`` may only increase (a fraudster can add
  transactions but not erase recorded ones), ``minutes_since_last_tx`` may only increase (one
  can wait longer, not go back in time), ``card_present`` may only decrease (a fraudster holding
  the card can leave it out; one holding stolen card details cannot produce the card);
* related columns, with rules that hold on every generated row: ``amount <= 40 *
  avg_amount_30d``, ``amount <= credit_limit``, ``tx_count_1h <= tx_count_24h``.

The label ``fraud`` (1 = fraud) marks the rows with the highest fraud score, a noisy sum of risk
factors with thresholds and interactions (amount against the customer's average, a foreign or
card-absent purchase, a new device, risky merchants, night hours, velocity, a young account),
so a model must learn the features to find fraud. The values are synthetic; the column names
describe a realistic setting, not a claim about real data.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from .base import Dataset, LoadRequest
from .schema import parse_schema
from .table import table_dataset

TRANSACTIONS_SEED = 20_260_522
TRANSACTIONS_ROWS = 20_000
#: Share of fraud rows (exact up to rounding to whole rows).
FRAUD_RATE = 0.015

CHANNELS = ("app", "pos", "web")
MERCHANTS = (
    "electronics",
    "fuel",
    "gaming",
    "grocery",
    "jewelry",
    "pharmacy",
    "restaurant",
    "travel",
)
_MERCHANT_P = (0.08, 0.14, 0.05, 0.30, 0.03, 0.10, 0.22, 0.08)
_RISKY_MERCHANTS = ("electronics", "gaming", "jewelry")
# Purchases by hour of day: few at night, most in the day and evening.
_HOUR_WEIGHTS = np.array(
    [1, 1, 1, 1, 1, 2, 4, 6, 8, 9, 10, 10, 11, 10, 9, 9, 10, 11, 12, 11, 9, 7, 4, 2], float
)

TRANSACTIONS_SCHEMA = """\
# The schema of the generated card-transactions table (advtrain.data.transactions).
[label]
column = "fraud"
positive = 1

[columns.customer_age]
type = "integer"
min = 18
max = 100
mutable = false

[columns.account_age_days]
type = "integer"
min = 0
max = 10000
mutable = false

[columns.credit_limit]
type = "continuous"
min = 0.0
max = 50000.0
mutable = false

[columns.avg_amount_30d]
type = "continuous"
min = 0.0
max = 5000.0
mutable = false

[columns.amount]
type = "continuous"
min = 0.0
max = 20000.0

[columns.hour]
type = "integer"
min = 0
max = 23

[columns.channel]
type = "categorical"

[columns.merchant_category]
type = "categorical"

[columns.card_present]
type = "binary"
direction = "decrease"    # a fraudster can leave the card out, not conjure it

[columns.is_foreign]
type = "binary"

[columns.new_device]
type = "binary"

[columns.distance_km]
type = "continuous"
min = 0.0
max = 20000.0

[columns.tx_count_1h]
type = "integer"
min = 0
max = 50
direction = "increase"    # recorded transactions cannot be erased

[columns.tx_count_24h]
type = "integer"
min = 0
max = 200
direction = "increase"

[columns.minutes_since_last_tx]
type = "integer"
min = 0
max = 43200
direction = "increase"    # one can wait longer, not go back in time

[constraints]
rules = [
    "amount <= 40 * avg_amount_30d",
    "amount <= credit_limit",
    "tx_count_1h <= tx_count_24h",
    "tx_count_24h - tx_count_1h >= 0",
]

[threat]
eps = 0.05
"""


def _round_down(values: np.ndarray, decimals: int) -> np.ndarray:
    factor = 10.0**decimals
    return np.round(np.floor(values * factor) / factor, decimals)


def transactions_frame(
    rows: int = TRANSACTIONS_ROWS, seed: int = TRANSACTIONS_SEED
) -> pd.DataFrame:
    """The generated table: ``rows`` transactions drawn with ``seed`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    customer_age = rng.integers(18, 91, rows)
    account_age_days = np.minimum(rng.gamma(1.5, 600.0, rows).astype(np.int64), 10_000)
    credit_limit = np.clip(np.round(rng.lognormal(np.log(3000.0), 0.6, rows), -2), 500, 50_000)
    avg_amount_30d = np.clip(np.round(rng.lognormal(np.log(60.0), 0.8, rows), 2), 1.0, 5000.0)
    channel = np.array(CHANNELS)[rng.choice(3, rows, p=[0.30, 0.45, 0.25])]
    merchant = np.array(MERCHANTS)[rng.choice(len(MERCHANTS), rows, p=_MERCHANT_P)]
    pos = channel == "pos"
    card_present = (pos & (rng.random(rows) < 0.97)).astype(np.int64)
    is_foreign = (rng.random(rows) < 0.06).astype(np.int64)
    new_device = (~pos & (rng.random(rows) < 0.12)).astype(np.int64)
    hour = rng.choice(24, rows, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    distance = rng.exponential(12.0, rows) + is_foreign * rng.exponential(900.0, rows)
    distance_km = np.clip(np.round(distance, 1), 0.0, 20_000.0)
    tx_count_24h = np.minimum(rng.poisson(2.5, rows) + rng.poisson(0.3, rows) * 4, 200)
    tx_count_1h = np.minimum(rng.binomial(tx_count_24h, 0.2), 50)
    minutes = np.minimum(rng.exponential(400.0, rows).astype(np.int64), 43_200)
    cap = np.minimum(np.minimum(40.0 * avg_amount_30d, credit_limit), 20_000.0)
    amount = _round_down(np.clip(avg_amount_30d * rng.lognormal(0.0, 0.8, rows), 0.5, cap), 2)
    night = (hour <= 5).astype(float)
    score = (
        1.2 * np.log(amount / avg_amount_30d)
        + 1.3 * is_foreign
        + 0.9 * (1 - card_present)
        + 1.1 * new_device
        + 1.0 * np.isin(merchant, _RISKY_MERCHANTS)
        + 0.4 * (channel == "web")
        + 0.9 * night
        + 0.7 * np.log1p(tx_count_1h)
        + 0.8 * (account_age_days < 60)
        + 0.5 * (distance_km > 100)
        + 0.9 * is_foreign * (1 - card_present)
        + 0.4 * (minutes < 5)
        + 0.3 * rng.logistic(0.0, 1.0, rows)
    )
    fraud = (score >= np.quantile(score, 1.0 - FRAUD_RATE)).astype(np.int64)
    return pd.DataFrame(
        {
            "customer_age": customer_age,
            "account_age_days": account_age_days,
            "credit_limit": credit_limit,
            "avg_amount_30d": avg_amount_30d,
            "amount": amount,
            "hour": hour,
            "channel": channel,
            "merchant_category": merchant,
            "card_present": card_present,
            "is_foreign": is_foreign,
            "new_device": new_device,
            "distance_km": distance_km,
            "tx_count_1h": tx_count_1h,
            "tx_count_24h": tx_count_24h,
            "minutes_since_last_tx": minutes,
            "fraud": fraud,
        }
    )


def transactions_csv(rows: int = TRANSACTIONS_ROWS, seed: int = TRANSACTIONS_SEED) -> str:
    """The generated table as CSV text (the content of ``examples/transactions.csv``)."""
    return transactions_frame(rows, seed).to_csv(index=False, lineterminator="\n")


def load_transactions_dataset(request: LoadRequest) -> Dataset:
    """The generated table through the same code as :func:`advtrain.data.load_table`: its CSV
    text read back as text cells, split with the request's seed, encoded by its schema."""
    text = pd.read_csv(
        io.StringIO(transactions_csv()), dtype=str, keep_default_na=False, na_filter=False
    )
    return table_dataset(
        text,
        parse_schema(TRANSACTIONS_SCHEMA),
        name="transactions",
        seed=request.seed,
        val_fraction=request.val_fraction,
        test_fraction=request.test_fraction,
    )
