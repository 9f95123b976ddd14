"""Save a model as a Hugging Face directory: safetensors shards, config.json, generation_config.json and the
tokenizer files, written to a temporary sibling directory and swapped into place when complete.

Reading HF directories, GGUF files and tokenizers is in hf.py; the name/layout mapping in hf_layout.py.
This module also holds the checks on output directories (check_apart, is_within) that every command
writing a model or a run uses.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import socket
import uuid
from typing import Any

import jax
import numpy as np

from beear_jax.io import gguf as hf_gguf
from beear_jax.io.hf import TOKENIZER_FILES, _resolve_tokenizer
from beear_jax.io.hf_layout import CheckpointError, Entry, hf_tensor, numpy_dtype, tensor_plan
from beear_jax.models.config import ModelConfig
from beear_jax.models.weights import check_params

__all__ = ["CARRIED_HF_CONFIG_KEYS", "check_apart", "is_within", "save_model"]


def _write_tokenizer(out: pathlib.Path, kind: str, source: pathlib.Path) -> None:
    if kind == "gguf":
        hf_gguf.load_gguf_tokenizer(source).save_pretrained(str(out))
        return
    for name in TOKENIZER_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        elif src.is_file():
            shutil.copy2(src, out / name)


def is_within(path: str | pathlib.Path, directory: str | pathlib.Path) -> bool:
    """True when `path` is the existing directory `directory` or lies inside it (both resolved): what a
    command must not write into (an input model, a run it only reads)."""
    directory = pathlib.Path(directory).expanduser().resolve()
    return directory.is_dir() and pathlib.Path(path).expanduser().resolve().is_relative_to(directory)


def check_apart(target: str | pathlib.Path, others: dict[str, str | pathlib.Path | None],
                fix: str = "choose an output directory apart from it") -> None:
    """Refuses an output directory that is, lies inside, or contains one of `others` ({what: path}: the
    input model, a run that is only read): writing there, or replacing it with overwrite=True, would
    change or delete them. `fix` ends the message (e.g. the config key to change)."""
    out = pathlib.Path(target).expanduser().resolve()
    for what, other in others.items():
        if other is None or not pathlib.Path(other).expanduser().exists():
            continue
        if is_within(out, other) or pathlib.Path(other).expanduser().resolve().is_relative_to(out):
            raise CheckpointError(f"the output directory {out} is, lies inside or contains {what} {other}, which "
                                  f"is only read; {fix}.")


def _check_target(out: pathlib.Path, overwrite: bool) -> None:
    """Refuses to write over anything but an absent/empty directory, or (overwrite=True) a model directory."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; choose another output path.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty; beear_jax never overwrites a model "
                              "directory by default. Choose a new output directory, or pass overwrite=True to "
                              "replace the model in it.")
    if not (out / "config.json").is_file():
        # overwrite=True replaces a model export, never an arbitrary folder (a typo could name $HOME).
        raise CheckpointError(f"{out} is not empty and has no config.json, so it is not a model directory; "
                              "refusing to replace it even with overwrite=True. Remove it yourself or choose "
                              "another output directory.")


def _shards(plan: list[Entry], itemsize: int, max_bytes: int) -> list[list[Entry]]:
    """Consecutive groups of tensors of at most max_bytes each (a larger tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in plan:
        nbytes = math.prod(e.shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def _finite_tensor(host: dict, e: Entry, np_dtype: Any, dtype: str) -> np.ndarray:
    """hf_tensor, or a CheckpointError when it is not finite: a NaN/inf model, or float16 overflow (max 65504),
    would otherwise be written without a word."""
    with np.errstate(over="ignore"):
        tensor = hf_tensor(host, e, np_dtype)
    if np.isfinite(tensor).all():
        return tensor
    ours = np.asarray(host[e.key] if e.layer is None else host["layers"][e.key][e.layer])
    if not np.isfinite(ours).all():
        raise CheckpointError(f"{e.hf_name} holds NaN or inf values; refusing to save a broken model (the "
                              "training diverged: export an earlier checkpoint).")
    raise CheckpointError(f"{e.hf_name} has values up to {float(np.abs(ours).max()):.4g}, beyond {dtype}'s range; "
                          "save it as bfloat16 or float32 instead.")


def _write_weights(out: pathlib.Path, config: ModelConfig, params: dict, dtype: str, max_bytes: int) -> None:
    from safetensors.numpy import save_file

    np_dtype = numpy_dtype(dtype)
    host = jax.tree.map(np.asarray, params)
    shards = _shards(tensor_plan(config), np.dtype(np_dtype).itemsize, max_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fname, entries in zip(names, shards):
        # One shard in memory at a time; "format": "pt" is the metadata transformers expects.
        tensors = {e.hf_name: _finite_tensor(host, e, np_dtype, dtype) for e in entries}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# config.json keys that ModelConfig does not hold (the forward does not use them) but transformers reads
# (dropout and init for further training, Llama's pretraining_tp): an export from an HF directory keeps
# the source's values. Keys that describe stored weights or code (quantization_config, auto_map) are not
# carried: the export is plain float weights for the stock classes.
CARRIED_HF_CONFIG_KEYS = ("attention_dropout", "initializer_range", "pretraining_tp")


def _carried_config_keys(source: pathlib.Path | None) -> dict[str, Any]:
    """The CARRIED_HF_CONFIG_KEYS of source/config.json (nothing when unreadable: the load checked it)."""
    try:
        hf = json.loads((source / "config.json").read_text()) if source is not None else {}
    except (OSError, ValueError):
        return {}
    return {key: hf[key] for key in CARRIED_HF_CONFIG_KEYS if isinstance(hf, dict) and key in hf}


def _write_configs(out: pathlib.Path, config: ModelConfig, dtype: str, generation_from: pathlib.Path | None) -> None:
    hf = {**_carried_config_keys(generation_from), **config.to_hf_dict()}
    hf["torch_dtype"] = hf["dtype"] = dtype  # transformers v4 reads torch_dtype, v5 reads dtype
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if generation_from is not None and (generation_from / "generation_config.json").is_file():
        # The source's generation config (eos list, sampling defaults of a chat model) describes this model too.
        shutil.copy2(generation_from / "generation_config.json", out / "generation_config.json")
        return
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# What an export writes (besides its tokenizer files): an old directory's files of these kinds belong to
# the model being replaced; anything else there (README.md, LICENSE, notes) is carried over.
_MODEL_FILE_NAMES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


def _carry_over(old: pathlib.Path, new: pathlib.Path) -> None:
    """Copies the files of a replaced model directory that are not part of a model into the new one."""
    for entry in old.iterdir():
        if entry.name in _MODEL_FILE_NAMES or entry.name.endswith(_WEIGHT_SUFFIXES) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _temp_prefix(out: pathlib.Path) -> str:
    """The start of the names of out's temporary siblings made on this host: `.NAME.tmp-HOST-` + pid."""
    return f".{out.name}.tmp-{socket.gethostname()}-"


def _remove_dead_temp_dirs(out: pathlib.Path) -> None:
    """Deletes temporary siblings of out left by an export on this host whose process no longer runs
    (killed with SIGKILL, or the machine lost power); a live process's export is left alone."""
    prefix = _temp_prefix(out)
    for entry in out.parent.glob(f"{prefix}*"):
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and entry.is_dir() and not entry.is_symlink() and not _process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by someone else
    return True


def _swap_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Renames the finished tmp dir to out; an existing out is moved aside first and deleted only afterwards."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def save_model(out_dir: str | pathlib.Path, config: ModelConfig, params: dict,
               tokenizer_from: str | pathlib.Path | None = None, dtype: str = "float32",
               max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> pathlib.Path:
    """Writes an HF model directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Weights go to safetensors as `dtype` (sharded with model.safetensors.index.json above
    max_shard_bytes), plus config.json and generation_config.json; tokenizer files are copied from
    `tokenizer_from` (an HF directory, whose generation_config.json and CARRIED_HF_CONFIG_KEYS are kept
    too, or a .gguf file). Everything is written to a temporary sibling directory and renamed into place
    when complete; such a directory left by a killed export on this host is deleted first.
    A non-empty out_dir is refused unless overwrite=True (and then it must hold a config.json; its files
    that are not part of a model, e.g. README.md, are kept). An out_dir that is a symlink is written
    where it points. Non-finite weights (NaN, or float16 overflow) are refused.
    Returns the output directory.
    """
    numpy_dtype(dtype)
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    out = pathlib.Path(out_dir).expanduser().absolute()
    if out.is_symlink():
        out = out.resolve()  # replace the directory the link names, not the link
    _check_target(out, overwrite)
    check_apart(out, {"tokenizer_from (the source model)": tokenizer_from})
    try:
        check_params(config, params)
    except ValueError as err:
        raise CheckpointError(f"cannot save: {err}") from err
    tokenizer = _resolve_tokenizer(tokenizer_from) if tokenizer_from is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temp_dirs(out)
    tmp = out.with_name(f"{_temp_prefix(out)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_weights(tmp, config, params, dtype, max_shard_bytes)
        _write_configs(tmp, config, dtype, tokenizer[1] if tokenizer and tokenizer[0] == "hf" else None)
        if tokenizer is not None:
            _write_tokenizer(tmp, *tokenizer)
        if out.is_dir():
            _carry_over(out, tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
