"""Hugging Face checkpoints and GGUF files in and out as Flax NNX modules (models/module.py's CausalLM).

    model = load_module("SmolLM2-135M-Instruct.Q4_1.gguf")      # or an HF model directory
    save_module("out/model", model, tokenizer_from="SmolLM2-135M-Instruct.Q4_1.gguf")

The reading and writing are hf.py's and hf_save.py's (load_model / save_model: checks, atomic writes, no overwriting of
a model directory unless asked); this module turns their params tree into the module and back.
"""

from __future__ import annotations

import pathlib

import jax

from beear_jax.io.hf import load_model
from beear_jax.io.hf_save import save_model
from beear_jax.models.module import CausalLM


def load_module(path: str | pathlib.Path, dtype: str = "float32", allow_pickle: bool = False) -> CausalLM:
    """A CausalLM with the float32 weights of an HF directory or a .gguf file (hf.load_model's rules;
    `dtype` is the compute dtype recorded in its config). Its call returns transformers' logits."""
    config, params = load_model(path, dtype, allow_pickle)
    return CausalLM.from_params(config, params)


def save_module(out_dir: str | pathlib.Path, model: CausalLM, tokenizer_from: str | pathlib.Path | None = None,
                dtype: str = "float32", overwrite: bool = False) -> pathlib.Path:
    """Writes the module's weights as an HF model directory (hf.save_model: safetensors as `dtype`,
    config.json, tokenizer files from `tokenizer_from`; written atomically; a non-empty out_dir is
    refused unless overwrite=True). Returns the directory."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_module takes a beear_jax CausalLM, got {type(model).__name__}; "
                        "for a (config, params) pair use beear_jax.save_model.")
    params = jax.device_get(model.params_tree())
    return save_model(out_dir, model.config, params, tokenizer_from=tokenizer_from, dtype=dtype, overwrite=overwrite)
