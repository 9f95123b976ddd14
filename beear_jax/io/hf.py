"""Load Hugging Face checkpoints: HF directories (safetensors, single or sharded), GGUF files, tokenizers.

The name/layout mapping lives in hf_layout.py and GGUF reading in gguf.py; this module deals with
files: finding and validating them. Saving (an atomic export that carries the tokenizer along) is in
hf_save.py.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

from beear_jax.io import gguf as hf_gguf
from beear_jax.io.hf_layout import (
    DTYPES,
    CheckpointError,
    as_numpy,
    few,
    from_hf_state_dict,
    numpy_dtype,
    params_from_source,
    to_hf_state_dict,
)
from beear_jax.models.config import ModelConfig, ModelConfigError

__all__ = ["DTYPES", "CheckpointError", "check_tokenizer_fits", "from_hf_state_dict", "load_model", "load_tokenizer",
           "to_hf_state_dict"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "additional_chat_templates")
_FORMAT_HINT = "Pass an HF model directory (config.json + model*.safetensors) or a .gguf file."


# ---- reading checkpoints -------------------------------------------------------------------------------


def model_path(path: str | pathlib.Path) -> pathlib.Path:
    """A user-given model path with ~ expanded; an empty one is refused (Path("") would mean the current
    directory, and a .gguf file there would load silently)."""
    if not str(path).strip():
        raise CheckpointError("the model path is empty; pass an HF model directory or a .gguf file "
                              "(--config.model.path=... / --model ...).")
    return pathlib.Path(path).expanduser()


def _resolve(path: pathlib.Path) -> tuple[str, pathlib.Path]:
    """("hf", model dir) or ("gguf", file) for a user-given path, or a CheckpointError saying what to pass."""
    if not path.exists():
        raise CheckpointError(f"no such file or directory: {path}. {_FORMAT_HINT}")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise CheckpointError(f"{path} is a file but not a .gguf file. {_FORMAT_HINT} For an HF checkpoint pass "
                              "its directory.")
    if (path / "config.json").is_file():
        return "hf", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if ggufs:
        raise CheckpointError(f"{path} holds several .gguf files ({few([g.name for g in ggufs])}); pass one of "
                              "them.")
    raise CheckpointError(f"{path} has no config.json (and no .gguf file), so it is not an HF model directory. "
                          f"{_FORMAT_HINT}")


def _config_from_dict(hf: dict[str, Any], dtype: str, where: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf_dict(hf, dtype=dtype)
    except ModelConfigError as err:
        raise CheckpointError(f"{where}: {err}") from err


def _read_config(model_dir: pathlib.Path, dtype: str) -> ModelConfig:
    where = str(model_dir / "config.json")
    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where} is not readable JSON ({err}); restore it from the model's source.") from err
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where} is not a JSON object; restore it from the model's source.")
    return _config_from_dict(hf, dtype, where)


def _safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The weight files: those named by model.safetensors.index.json, else model.safetensors, else *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            parsed = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{index} is not a valid shard index ({err}); download it again.") from err
        names = _shard_names(parsed, index)
        absent = [n for n in names if not (model_dir / n).is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard(s) that are not there: {few(absent)}; download them.")
        return [model_dir / n for n in names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    return sorted(f for f in model_dir.glob("*.safetensors") if f.is_file())


def _shard_names(index: Any, where: pathlib.Path) -> list[str]:
    """The shard file names of a parsed model.safetensors.index.json ({"weight_map": {tensor: file}}), sorted;
    a CheckpointError saying what is wrong when it does not have that form (`where`: the index's path)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    problem = None if isinstance(weight_map, dict) else 'it has no "weight_map" object'
    entries = weight_map.items() if isinstance(weight_map, dict) else ()
    bad = [f"{k}: {v!r}" for k, v in entries if not isinstance(v, str) or not v]
    if bad:
        problem = f"weight_map values must be shard file names, got {few(bad)}"
    if problem:
        raise CheckpointError(f"{where} is not a valid shard index ({problem}); download it again.")
    return sorted(set(weight_map.values()))


def _safetensors_source(files: list[pathlib.Path]) -> tuple[dict[str, tuple[int, ...]], Callable[[str], Any]]:
    """Tensor shapes (from the headers only) and a reader that loads one tensor on demand."""
    from safetensors import SafetensorError, safe_open

    shapes, owner = {}, {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="numpy")
            names = handle.keys()
            for name in names:
                if name in owner:
                    raise CheckpointError(f"tensor {name} is stored in two files of {f.parent} ({f.name} and "
                                          "another); remove the stale copy (or add model.safetensors.index.json).")
                shapes[name] = tuple(handle.get_slice(name).get_shape())
                owner[name] = handle
        except SafetensorError as err:
            raise CheckpointError(f"{f} is not a readable safetensors file ({err}). It is probably truncated or "
                                  "corrupt (an interrupted download or copy): download or copy it again.") from err
    return shapes, lambda name: owner[name].get_tensor(name)


def _pickle_source(model_dir: pathlib.Path, allow_pickle: bool) -> tuple[dict, Callable[[str], Any]]:
    """Tensors of a pytorch_model*.bin checkpoint, only with allow_pickle (unpickling can run code)."""
    files = sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{model_dir} has no weights (no model.safetensors, shard index or *.safetensors); "
                              "download the checkpoint's .safetensors files into it.")
    if not allow_pickle:
        raise CheckpointError(
            f"{model_dir} holds only pickle weights ({few([f.name for f in files])}). Unpickling a file can run "
            "arbitrary code, so beear_jax refuses it by default. Prefer a safetensors copy of the model; if you "
            "trust the file's origin, write such a copy once with `beear convert --allow-pickle DIR NEW_DIR` "
            "and use NEW_DIR (Python API: load_model(DIR, allow_pickle=True)).")
    torch = hf_gguf.require_torch("Loading a pytorch_model.bin checkpoint")
    tensors: dict[str, Any] = {}
    for f in files:
        # weights_only=True still refuses pickled code (a whole pickled model, custom classes): it reads
        # state dicts of tensors, which is what save_pretrained writes.
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by cause
            raise CheckpointError(f"{f} cannot be read as a state dict of tensors ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}). It may be truncated, or hold a "
                                  "pickled model object rather than model.state_dict(); restore it, or save it with "
                                  "save_pretrained (safetensors).") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{f} does not hold a state dict of tensors; save the model with save_pretrained "
                                  "(safetensors).")
        tensors.update(state)
    return {n: tuple(t.shape) for n, t in tensors.items()}, lambda name: as_numpy(tensors[name])


def _load_gguf(path: pathlib.Path, dtype: str) -> tuple[ModelConfig, dict]:
    try:
        reader = hf_gguf.open_gguf(path)
        arch = hf_gguf.gguf_architecture(reader)
        supported = arch in hf_gguf.READABLE_ARCHITECTURES
        hf = hf_gguf.read_gguf_config(path) if supported else {}
        names = hf_gguf.gguf_tensor_names(reader)
    except (ValueError, KeyError, IndexError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read this GGUF file ({err}). Check that it is a complete Llama, "
                              "Mistral, Qwen2 or Qwen3 GGUF file.") from err
    if not supported:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; beear_jax reads GGUF files of "
                              f"architecture {', '.join(map(repr, hf_gguf.READABLE_ARCHITECTURES))} (how llama.cpp "
                              "writes Llama, Mistral 7B, SmolLM2, Qwen2/Qwen2.5 and Qwen3). Load the model's HF "
                              "checkpoint directory instead.")
    hf.update(hf_gguf.bias_flags_from_gguf(names, str(path), arch))
    if "head_dim" not in hf:  # transformers reads it for llama only (from the RoPE dimensions)
        hf["head_dim"] = hf_gguf.gguf_head_dim(reader)
    plain = _config_from_dict(hf, dtype, str(path))
    meta, freq_factors = hf_gguf.read_gguf_rope(reader)
    hf["rope_scaling"] = hf_gguf.rope_scaling_from_gguf(meta, freq_factors, plain.rope_theta, plain.head_dim, str(path))
    config = _config_from_dict(hf, dtype, str(path))
    try:
        tensors = hf_gguf.read_gguf_tensors(reader, config.num_heads, config.num_kv_heads)
    except (NotImplementedError, ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read this GGUF file's tensors ({err}). Load the model's HF "
                              "checkpoint directory instead.") from err
    shapes = {name: x.shape for name, x in tensors.items()}
    return config, params_from_source(config, shapes, tensors.__getitem__, str(path))


def source_dtype(path: str | pathlib.Path) -> str:
    """The dtype a checkpoint stores its weights in: an HF directory's config.json torch_dtype (or dtype),
    float32 where that is missing or unknown, and float32 for GGUF (its quantized blocks are dequantized
    in float32; 16 bits would round them again)."""
    kind, where = _resolve(model_path(path))
    if kind == "gguf":
        return "float32"
    try:
        hf = json.loads((where / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "float32"
    stored = (hf.get("torch_dtype") or hf.get("dtype")) if isinstance(hf, dict) else None
    return stored if stored in DTYPES else "float32"


def load_model(path: str | pathlib.Path, dtype: str = "float32", allow_pickle: bool = False) -> tuple[ModelConfig, dict]:
    """Loads an HF checkpoint directory or a .gguf file as (ModelConfig, float32 numpy params).

    `dtype` is the compute dtype recorded in the config; params are always float32 (the master copy) and
    stay on the host, so the caller can place them on a mesh. GGUF files are dequantized; their config is
    read through transformers, which needs torch. A directory with no config.json but exactly one .gguf
    file loads that file.
    """
    numpy_dtype(dtype)
    kind, target = _resolve(model_path(path))
    if kind == "gguf":
        return _load_gguf(target, dtype)
    config = _read_config(target, dtype)
    files = _safetensors_files(target)
    shapes, get = _safetensors_source(files) if files else _pickle_source(target, allow_pickle)
    return config, params_from_source(config, shapes, get, str(target))


# ---- tokenizers ----------------------------------------------------------------------------------------


def _resolve_tokenizer(path: str | pathlib.Path) -> tuple[str, pathlib.Path]:
    """("hf", dir with tokenizer files) or ("gguf", file), or a CheckpointError."""
    path = model_path(path)
    if path.is_dir() and any((path / name).exists() for name in TOKENIZER_FILES):
        return "hf", path
    ggufs = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if not path.exists():
        raise CheckpointError(f"no such file or directory: {path}. Pass the directory of the original model "
                              "(with tokenizer.json etc.) or its .gguf file.")
    if len(ggufs) == 1 and ggufs[0].is_file():
        return "gguf", ggufs[0]
    raise CheckpointError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...) and is not a "
                          "single .gguf file; pass the directory of the original model or its .gguf file.")


def check_tokenizer_fits(tokenizer: Any, config: ModelConfig, where: str) -> None:
    """A CheckpointError when the tokenizer has more tokens than the model has embedding rows.

    Ids past the embedding would be clamped silently (garbage answers, or a NaN loss far from its cause);
    this happens when a model directory is paired with another model's tokenizer files.
    """
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                              f"{config.vocab_size}; the tokenizer files belong to another model. Put the model's "
                              "own tokenizer files next to its weights.")


def load_tokenizer(path: str | pathlib.Path, model_config: ModelConfig | None = None) -> Any:
    """A transformers tokenizer from an HF directory with tokenizer files or from a .gguf file.

    With model_config, a tokenizer with more tokens than the model's embedding rows is refused
    (check_tokenizer_fits).
    """
    kind, target = _resolve_tokenizer(path)
    if kind == "gguf":
        tokenizer = hf_gguf.load_gguf_tokenizer(target)
    else:
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(target))
        except ImportError:
            raise
        except Exception as err:  # transformers/tokenizers raise many types for damaged files
            raise CheckpointError(f"{target}: the tokenizer files cannot be loaded ({type(err).__name__}: {err}); "
                                  "restore tokenizer.json / tokenizer_config.json / config.json from the model's "
                                  "source.") from err
    if model_config is not None:
        check_tokenizer_fits(tokenizer, model_config, str(path))
    return tokenizer

