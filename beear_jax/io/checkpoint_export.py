"""Finding a run's checkpoint and reading its params for export (`beear export`): a run's output_dir, its
checkpoints/ directory or one checkpoints/<step> directory; the run directories' tests (is_run_output,
is_hf_model_dir). Only reads: the run directory is left as it is.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np

from beear_jax.io.run_checkpointer import (
    ITEMS,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    RunCheckpointer,
    abstract_like,
    first_line,
)

_PASS_RUN_DIR = "pass the run's output_dir (the --config.output_dir of `beear run`, which holds checkpoints/)"


def find_checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A run's output_dir or its checkpoints/ directory -> the checkpoints directory."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist; {_PASS_RUN_DIR}.")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise CheckpointNotFoundError(f"{path} is a file, not a run directory; {_PASS_RUN_DIR}.")


def split_step_dir(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """`RUN/checkpoints/4` (one checkpoint's directory) -> (RUN/checkpoints, 4); any other path -> (path, None)."""
    path = pathlib.Path(path).expanduser()
    if path.name.isdigit() and path.is_dir() and any((path / name).exists() for name in ITEMS):
        return path.parent, int(path.name)
    return path, None


def run_dir_of(path: str | pathlib.Path) -> pathlib.Path:
    """The run's output_dir of a path given to export: the run directory itself, its checkpoints/ or
    one checkpoints/<step> directory (resolved)."""
    base, _ = split_step_dir(path)
    base = base.resolve()
    return base.parent if base.name == "checkpoints" else base


def is_run_output(path: str | pathlib.Path) -> bool:
    """True if `path` is (part of) a `beear run` output rather than a model: the run's output_dir (it holds
    checkpoints/ or metrics.jsonl), its checkpoints/ directory, or one checkpoints/<step> directory."""
    path = pathlib.Path(path).expanduser()
    if not path.is_dir():
        return False
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        return True
    if split_step_dir(path)[1] is not None:
        return True
    return path.name == "checkpoints" and any(split_step_dir(child)[1] is not None for child in path.iterdir())


def is_hf_model_dir(path: str | pathlib.Path) -> bool:
    """True if `path` is a directory whose config.json names a model_type (an HF model, not a run)."""
    config = pathlib.Path(path).expanduser() / "config.json"
    try:
        return isinstance(json.loads(config.read_text()).get("model_type"), str)
    except (OSError, ValueError, AttributeError):
        return False


def restore_params_for_export(directory: str | pathlib.Path, step: int | None = None) -> tuple[Any, dict]:
    """Params (numpy, on the host) and meta of the newest good (or the given) checkpoint.

    `directory` is a run's output_dir, its checkpoints/ directory or one step's directory
    (checkpoints/<step>, the same as step=<step>). Nothing in it is changed: a corrupt newer step is
    reported and skipped (not renamed). The params are read sharded over all local devices (fsdp over
    the embedding axis), so a model larger than one device's memory can be exported, then gathered to
    the host one array at a time. Raises CheckpointNotFoundError (no checkpoints, no such step: the
    message lists the steps there are) or CheckpointCorruptError (the given step, or every step, is
    unreadable).
    """
    from beear_jax.models.config import ModelConfig
    from beear_jax.parallel import sharding as sharding_lib

    base, step_in_path = split_step_dir(directory)
    if step_in_path is not None and step is not None and step != step_in_path:
        raise ValueError(f"{directory} is checkpoint {step_in_path} but step {step} was asked for; pass the run "
                         "directory with the step you want, or the step's directory alone.")
    step = step_in_path if step_in_path is not None else step
    checkpointer = RunCheckpointer(base if step_in_path is not None else find_checkpoint_dir(base),
                                   async_save=False, read_only=True)
    mesh = sharding_lib.make_mesh((1, -1, 1))

    def targets(meta: dict) -> dict:
        model_config = ModelConfig.from_hf_dict(meta["model_config"])
        shardings = sharding_lib.param_shardings(model_config, mesh)
        return {"params": abstract_like(sharding_lib.abstract_param_tree(model_config), shardings)}

    try:
        steps = checkpointer.steps()
        if not steps and is_hf_model_dir(checkpointer.directory):
            raise CheckpointNotFoundError(
                f"{checkpointer.directory} is an HF model directory, not a run: export reads a run's checkpoints "
                f"({_PASS_RUN_DIR}); to copy this model (e.g. in another dtype) use `beear convert "
                f"{checkpointer.directory} OUT`.")
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoints in {checkpointer.directory}; {_PASS_RUN_DIR}, its "
                                          "checkpoints/ directory or one checkpoints/<step> directory.")
        if step is None:
            found = checkpointer.restore_latest(targets, names=("params",))
            assert found is not None
            items, meta = found
        elif step not in steps:
            set_aside = sorted(p.name for p in pathlib.Path(checkpointer.directory).glob(f"corrupt-{step}*")
                               if p.name == f"corrupt-{step}" or p.name.startswith(f"corrupt-{step}-"))
            why = (f" (a resume found step {step} corrupt or partial and set it aside as {set_aside[0]})"
                   if set_aside else "")
            raise CheckpointNotFoundError(f"{checkpointer.directory} has no checkpoint {step}{why}; the checkpoints "
                                          f"there are steps {', '.join(map(str, steps))} (or leave the step out for "
                                          "the newest good one).")
        else:
            try:
                items, meta = checkpointer.restore_step(step, targets, ("params",))
            except Exception as err:  # orbax/tensorstore raise many types for bad files
                others = [s for s in steps if s != step]
                hint = (f"choose another step ({', '.join(map(str, others))}) or leave the step out for the newest "
                        "good one" if others else "restore a copy of the run directory")
                raise CheckpointCorruptError(f"checkpoint {checkpointer.directory}/{step} cannot be read "
                                             f"({first_line(err)}); {hint}.") from err
        params = jax.tree.map(lambda x: np.asarray(sharding_lib.to_host(x)), items["params"])
        return params, meta
    finally:
        checkpointer.close()
