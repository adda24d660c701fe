"""The data a training configuration names, read as ``advtrain train`` reads it."""

from __future__ import annotations

from ..data import Dataset, load_dataset, load_images, load_table
from .config import TrainConfig


def load_config_data(config: TrainConfig) -> Dataset:
    """The configuration's table (``data`` with ``schema``), images (``data`` alone) or named
    dataset, split by its seed and its validation and test fractions."""
    val, test = config.val_fraction, config.test_fraction
    if config.data is not None and config.schema is None:
        return load_images(
            config.data,
            image_size=config.image_size,
            seed=config.seed,
            val_fraction=val,
            test_fraction=test,
        )
    if config.data is not None:
        return load_table(
            config.data, config.schema, seed=config.seed, val_fraction=val, test_fraction=test
        )
    return load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        seed=config.seed,
        val_fraction=val,
        test_fraction=test,
    )
