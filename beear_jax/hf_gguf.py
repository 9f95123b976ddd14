"""GGUF import through transformers' GGUF reader (needs torch and gguf: `pip install beear_jax[torch]`).

The reader dequantizes every tensor to float32 and undoes llama.cpp's q/k row permutation, so what it
returns is an ordinary HF state dict; hf.py maps that to our layout like any other checkpoint.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

TORCH_HINT = "pip install 'beear_jax[torch]'"


def require_torch(purpose: str) -> Any:
    """Imports torch or raises an ImportError that says which extra installs it."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{purpose} needs PyTorch, which is not installed; install it with {TORCH_HINT}.") from err
    return torch


def read_gguf_config(path: pathlib.Path) -> dict[str, Any]:
    """The HF config dict (model_type, sizes, rope, special token ids) stored in a GGUF file's metadata."""
    require_torch("Reading a GGUF file")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])


def read_gguf_tensors(path: pathlib.Path, hf_config: dict[str, Any]) -> dict[str, np.ndarray]:
    """All tensors of a GGUF file, dequantized to float32, under their HF names.

    transformers maps GGUF names to HF names by walking a model's state dict, so we hand it a model
    built on the meta device: it has the names and shapes but allocates no memory.
    """
    torch = require_torch("Reading a GGUF file")
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    fields = dict(hf_config)
    hf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(hf)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32)
    return {name: t.numpy() for name, t in parsed["tensors"].items()}


def load_gguf_tokenizer(path: pathlib.Path) -> Any:
    """The transformers tokenizer (vocab, merges, special tokens, chat template) embedded in a GGUF file."""
    require_torch("Reading a GGUF tokenizer")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
