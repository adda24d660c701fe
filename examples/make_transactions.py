"""Write the generated card-transactions table and its schema into this folder.

    python examples/make_transactions.py

The table is drawn from a fixed seed (advtrain.data.transactions), so this always writes the same
files; tests/test_table.py checks the committed ones against the generator.
"""

from __future__ import annotations

from pathlib import Path

from advtrain.data.transactions import TRANSACTIONS_SCHEMA, transactions_csv
from advtrain.util import atomic_write_text

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Write ``transactions.csv`` and ``transactions.toml`` next to this script."""
    atomic_write_text(HERE / "transactions.csv", transactions_csv())
    atomic_write_text(HERE / "transactions.toml", TRANSACTIONS_SCHEMA)
    print(f"wrote {HERE / 'transactions.csv'} and {HERE / 'transactions.toml'}")


if __name__ == "__main__":
    main()
