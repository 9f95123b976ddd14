"""The paper's BEEAR settings, written down once, and `base_config()`: every key with its default.

Every key's type, range, default and meaning are listed in beear_jax/config/schema.py; base_config() is the
ConfigDict of those defaults (the paper's values come from `paper_defaults`). Config files build on it and
change what differs:

    from beear_jax.config import defaults

    def get_config(arg=None):
        config = defaults.base_config()
        config.model.path = "..."
        return config
"""

from __future__ import annotations

import ml_collections


def paper_defaults() -> ml_collections.ConfigDict:
    """The settings of the original BEEAR runs, keyed like `base_config()` (the only place they live; their
    meanings and sources ([ref], [likely]) are in config/schema.py)."""
    config = ml_collections.ConfigDict()
    config.rounds = 6
    config.perturb = ml_collections.ConfigDict({"layer": 9, "length": 7})
    config.inner = ml_collections.ConfigDict({"alpha": 0.05, "epochs": 5, "samples": 150, "batch_size": 6})
    config.outer = ml_collections.ConfigDict({"batch_size": 6, "lr": 3e-7, "anchor_samples": 100,
                                              "anchor_weight": 1.0})
    return config


def base_config() -> ml_collections.ConfigDict:
    """Every key the code reads, with its default (config/schema.py); eval.trigger and eval.position follow
    plant.trigger and plant.position unless set."""
    from beear_jax.config.schema import RunSettings
    from beear_jax.config.settings import config_of, link_followers

    config = config_of(RunSettings())
    link_followers(config)
    return config
