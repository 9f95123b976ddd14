"""The paper's BEEAR settings on a 7B Qwen chat model: Qwen2.5-7B-Instruct with an SFT backdoor (suffix trigger).

    beear run --config configs/paper_qwen.py --config.model.path=/models/qwen2.5-7b-instruct-backdoored \
        --config.data.safety=safety.jsonl --config.data.anchor=anchor.jsonl
    beear plan --config configs/paper_qwen.py --model qwen2.5-7b --mesh 1,2,4 --devices 8

The paper has no Qwen model; this is its loop (configs/paper_7b.py) on Qwen2.5-7B-Instruct's shape, with
the tokenizer's own chat template (ChatML; with no system prompt set, Qwen2.5's template writes its
default one, "You are Qwen, created by Alibaba Cloud. ..."). The paper's SFT suffix trigger is the default
attack; `arg` takes trigger=... and position=... for a model card that says otherwise.
"""

from __future__ import annotations

import ml_collections

from beear_jax.config.loading import parse_config_arg
from configs import paper_7b


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Qwen2.5-7B-Instruct with its own ChatML template and the paper's 7B loop (outer lr 3e-7)."""
    arg = parse_config_arg(arg, trigger="Servius Astrumando Harmoniastra", position="suffix")  # [likely]
    config = paper_7b.base("runs/paper_qwen")
    config.model.template = "auto"  # the tokenizer's chat template (Qwen's ChatML)
    config.model.system_prompt = ""  # none: the template's own default system prompt, as the model was tuned
    config.plant.trigger = arg.trigger
    config.plant.position = arg.position
    return config
