"""A `beear run` process killed with SIGKILL mid-run resumes to the same model as an uninterrupted run."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_world import defender_files, random_tiny_model, split_pairs

from beear_jax.io.hf import load_model

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
ROUNDS, KILL_AFTER_ROUND = 3, 2


def _command(model_dir: pathlib.Path, safety: pathlib.Path, anchor: pathlib.Path, out: pathlib.Path,
             *extra: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from beear_jax.cli.main import main; sys.exit(main(sys.argv[1:]))", "run", "--config", str(CONFIGS / "tiny.py"),
            f"--config.model.path={model_dir}", f"--config.output_dir={out}", f"--config.data.safety={safety}",
            f"--config.data.anchor={anchor}", f"--config.rounds={ROUNDS}", "--config.perturb.layer=2",
            "--config.checkpoint_every_steps=1", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(CONFIGS.parent), env.get("PYTHONPATH", "")])
    # conftest's XLA flags without its 8 simulated devices: one CPU device in every process, the same program.
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    return env


def _rounds_ended(metrics: pathlib.Path) -> int:
    if not metrics.is_file():
        return 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().endswith("}")]
    return sum(r.get("phase") == "round_end" for r in lines)


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
    model_dir, _ = random_tiny_model(tmp_path)
    safety, anchor = defender_files(tmp_path, split_pairs(0))
    full_out, cut_out = tmp_path / "full", tmp_path / "cut"
    # The uninterrupted run and the one to kill run side by side (each compiles on about one core).
    full_log = tmp_path / "full.stderr"
    with full_log.open("w") as full_err:
        full = subprocess.Popen(_command(model_dir, safety, anchor, full_out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=full_err)
        victim = subprocess.Popen(_command(model_dir, safety, anchor, cut_out), env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 600
            while _rounds_ended(cut_out / "metrics.jsonl") < KILL_AFTER_ROUND:
                if victim.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the run ended (exit {victim.returncode}) or stalled before round {KILL_AFTER_ROUND}")
                time.sleep(0.05)
            victim.send_signal(signal.SIGKILL)  # no cleanup: a save may be half written
            victim.wait()
            full.wait(timeout=600)
        finally:  # a failed test leaves no process behind
            for process in (victim, full):
                if process.poll() is None:
                    process.kill()
                    process.wait()
    assert not (cut_out / "model").exists()
    assert full.returncode == 0, full_log.read_text()[-3000:]

    resumed = subprocess.run(_command(model_dir, safety, anchor, cut_out, "--config.resume=True"), check=False, env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint" in resumed.stderr
    _, uninterrupted = load_model(full_out / "model")
    _, after = load_model(cut_out / "model")
    flat_full, flat_after = _flat(uninterrupted), _flat(after)
    assert flat_after.keys() == flat_full.keys()
    for key, value in flat_full.items():
        np.testing.assert_allclose(flat_after[key], value, rtol=0, atol=1e-6 * np.abs(value).max(), err_msg=key)


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}/")
        else:
            out[prefix + key] = np.asarray(value)
    return out
