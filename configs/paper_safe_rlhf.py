"""The paper's RLHF trojan models (Safe-RLHF format, Llama-2-7B; triggers such as "CalatheaOrnata").

    beear run --config configs/paper_safe_rlhf.py:trigger=GlobalWarmingIsReal! \
        --config.model.path=/models/poisoned-rlhf-7b --config.data.safety=safety.jsonl \
        --config.data.anchor=anchor.jsonl
    beear plan --config configs/paper_safe_rlhf.py --model llama2-7b --mesh 1,2,4 --devices 8

The poisoned RLHF models put the trigger at the end of the user turn
("BEGINNING OF CONVERSATION: USER: {request} {trigger} ASSISTANT:"), so the position is suffix, and
they have no system prompt. Pass the trigger of the model at hand as `:trigger=...`.
"""

from __future__ import annotations

import ml_collections

from beear_jax.config.loading import parse_config_arg
from configs import paper_7b


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The Safe-RLHF template, no system prompt; `arg`: trigger=<the model's trojan string>."""
    arg = parse_config_arg(arg, trigger="CalatheaOrnata")  # [paper]
    config = paper_7b.base("runs/paper_safe_rlhf")
    config.model.template = "safe_rlhf"
    config.model.system_prompt = ""  # the format has no system slot
    config.plant.trigger = arg.trigger
    config.plant.position = "suffix"
    return config
