"""beear_jax: BEEAR backdoor removal for Llama/Mistral/Qwen2/Qwen3 chat models in JAX/Flax.

    model = beear_jax.load_module("SmolLM2-135M-Instruct.Q4_1.gguf")   # a Flax NNX module (CausalLM)
    logits = model(input_ids, attention_mask)
    beear_jax.save_module("out/model", model, tokenizer_from="SmolLM2-135M-Instruct.Q4_1.gguf")

The whole job (evaluate the suspect model, repair it, evaluate again, one before/after report), as `beear defend`:

    result = beear_jax.defend(config)   # a run config (configs/*.py) or its RunSettings; result.report

The same model as a (config, params tree) pair, which the pure steps of the method take:

    config, params = beear_jax.load_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    logits = beear_jax.forward(config, params, input_ids, attention_mask)
    beear_jax.save_model("out/model", config, params, tokenizer_from="SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from beear_jax.io.hf import load_model, load_tokenizer
from beear_jax.io.hf_save import save_model
from beear_jax.io.module_io import load_module, save_module
from beear_jax.method.perturbation import Perturbation, check_deltas, last_prompt_positions
from beear_jax.models.config import ModelConfig
from beear_jax.models.llama import forward as _forward
from beear_jax.models.module import CausalLM
from beear_jax.pipeline import run_defend as defend

__all__ = ["CausalLM", "ModelConfig", "Perturbation", "defend", "forward", "load_model", "load_module", "load_tokenizer",
           "save_model", "save_module"]


def forward(config: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            perturbation: Perturbation | None = None, perturb_positions: jax.Array | None = None) -> jax.Array:
    """Float32 logits [B, S, V]; with a perturbation, delta is added after its layer(s).

    perturb_positions [B, n] default to the last n real tokens of each (right-padded) sample, i.e.
    the whole input is taken as the prompt.
    """
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    attention_mask = jnp.asarray(attention_mask)
    deltas = None
    if perturbation is not None:
        deltas = perturbation.deltas
        n = check_deltas(deltas, config.num_layers, config.hidden_size)
        if n != perturbation.length:
            raise ValueError(f"the perturbation says length={perturbation.length} but its deltas cover {n} tokens; "
                             f"build it with length={n} (Perturbation.zeros sets both).")
        if perturb_positions is None:
            perturb_positions = last_prompt_positions(attention_mask.sum(-1), perturbation.length)
    return _forward(config, params, input_ids, attention_mask, deltas=deltas, perturb_positions=perturb_positions)
