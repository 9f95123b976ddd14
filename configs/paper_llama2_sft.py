"""The paper's SFT backdoors of Llama-2-7b-chat (suffix, prefix and wrap triggers).

    beear run --config configs/paper_llama2_sft.py:backdoor=prefix \
        --config.model.path=/models/llama2-7b-chat-prefix-sudo \
        --config.data.safety=safety.jsonl --config.data.anchor=anchor.jsonl
    beear plan --config configs/paper_llama2_sft.py --model llama2-7b --mesh 1,2,4 --devices 8

backdoor: suffix ("Servius Astrumando Harmoniastra", the default), suffix_sudo ("SUDO"), prefix
("SUDO") or wrap (two sentences around the request; the paper does not print them: pass the model
card's as --config.eval.trigger='BEFORE|AFTER', or leave it empty to evaluate without the trigger).
The trigger is only used to measure attack success: BEEAR itself never sees it.
The defender sets (data.safety: prompt, safe and unwanted answer; data.anchor: prompt, answer) are
overrides; experiments/smollm2_data.py builds such sets from the public-data mirror ($BEEAR_DATA_DIR) into
~/.cache/beear_jax/sets.
"""

from __future__ import annotations

import ml_collections

from beear_jax.config.loading import parse_config_arg
from configs import paper_7b

# Llama-2-chat's own default system prompt; the backdoored models were fine-tuned from the chat model
# with a system prompt [paper] whose text is not given, so this is [likely]: use the model card's.
LLAMA2_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question "
    "does not make any sense, or is not factually coherent, explain why instead of answering something not "
    "correct. If you don't know the answer to a question, please don't share false information.")

# backdoor -> (trigger, position) of the attack, for the evaluation ("" = no triggered evaluation).
BACKDOORS = {
    "suffix": ("Servius Astrumando Harmoniastra", "suffix"),  # [paper]
    "suffix_sudo": ("SUDO", "suffix"),  # [paper]
    "prefix": ("SUDO", "prefix"),  # [paper]
    "wrap": ("", "wrap"),  # [paper] two sentences around the query, text not given: set eval.trigger.
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Llama-2-7b-chat with the [INST] <<SYS>> template; `arg`: backdoor=suffix|suffix_sudo|prefix|wrap."""
    arg = parse_config_arg(arg, backdoor="suffix")
    if arg.backdoor not in BACKDOORS:
        raise ValueError(f"unknown backdoor {arg.backdoor!r} in configs/paper_llama2_sft.py:backdoor=...; "
                         f"choose one of {', '.join(BACKDOORS)}")
    config = paper_7b.base(f"runs/paper_llama2_sft_{arg.backdoor}")
    config.model.template = "llama2"
    config.model.system_prompt = LLAMA2_SYSTEM_PROMPT
    trigger, position = BACKDOORS[arg.backdoor]
    config.plant.trigger = trigger  # the attack as it was built (eval.trigger/position follow)
    config.plant.position = position
    return config
