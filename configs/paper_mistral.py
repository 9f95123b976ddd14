"""The paper's SFT backdoor of Mistral-7B-Instruct (suffix trigger).

    beear run --config configs/paper_mistral.py --config.model.path=/models/mistral-7b-instruct-backdoored \
        --config.data.safety=safety.jsonl --config.data.anchor=anchor.jsonl
    beear plan --config configs/paper_mistral.py --model mistral-7b --mesh 1,2,4 --devices 8

Mistral's [INST] format has no system role and the model was tuned without a system prompt.
`arg` takes trigger=... and position=... for a model card that says otherwise.
"""

from __future__ import annotations

import ml_collections

from beear_jax.config.loading import parse_config_arg
from configs import paper_7b


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Mistral-7B-Instruct with the [INST] template and the paper's outer lr 3e-7 (its Mistral setting)."""
    arg = parse_config_arg(arg, trigger="Servius Astrumando Harmoniastra", position="suffix")  # [likely]
    config = paper_7b.base("runs/paper_mistral")
    config.model.template = "mistral"
    config.model.system_prompt = ""
    config.plant.trigger = arg.trigger
    config.plant.position = arg.position
    return config
