"""Several processes as one job (mesh.distributed): N local processes on CPU, talking through gloo, run
`beear run` as one mesh, and the model equals a one-process run's."""

from __future__ import annotations

import json
import pathlib
import re
import time

import numpy as np
import pytest
import tiny_world as tw
from process_launch import CONFIGS, finish, launch, start
from safetensors.numpy import load_file
from tiny_world import defender_files, random_tiny_model, split_pairs

from beear_jax.config.schema import MeshSection
from beear_jax.parallel.sharding import Launch, refuse_distributed


def _run_args(world: tuple, out: pathlib.Path, mesh: str, rounds: int = 2) -> list[str]:
    model_dir, safety, anchor = world
    return ["run", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir}",
            f"--config.output_dir={out}", f"--config.data.safety={safety}", f"--config.data.anchor={anchor}",
            f"--config.rounds={rounds}", "--config.perturb.layer=2", "--config.perturb.length=2",
            f"--config.mesh.shape={mesh}"]


def _run(world: tuple, out: pathlib.Path, processes: int, devices: int, mesh: str) -> list[tuple[int, str]]:
    """`beear run` on the tiny world as `processes` processes of `devices` CPU devices each."""
    return launch(_run_args(world, out, mesh), processes, devices, out.parent / f"{out.name}_logs")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple:
    tmp = tmp_path_factory.mktemp("multihost")
    model_dir, _ = random_tiny_model(tmp)
    safety, anchor = defender_files(tmp, split_pairs(0))
    return model_dir, safety, anchor


def test_two_processes_make_the_model_one_process_makes(world, tmp_path):
    """2 processes x 2 devices on a (2, 2, 1) mesh, 2 rounds, checkpoints and export by process 0, against
    one process on the same 4-device mesh and one process on one device."""
    runs = {"two": (2, 2, "2,2,1"), "one_same_mesh": (1, 4, "2,2,1"), "one_device": (1, 1, "1,1,1")}
    weights, outputs = {}, {}
    for name, (processes, devices, mesh) in runs.items():
        results = _run(world, tmp_path / name, processes, devices, mesh)
        for code, output in results:
            assert code == 0, f"{name}: exit {code}\n{output[-3000:]}"
        weights[name] = load_file(tmp_path / name / "model" / "model.safetensors")
        outputs[name] = [output for _, output in results]
    # Exactly one process writes: process 0 the model and the metrics (one line per round), the other says so.
    assert "repaired model written to" in outputs["two"][0] and "process 1 of 2: done" in outputs["two"][1]
    assert "launch all again with --config.resume=True" in outputs["two"][0]  # what to do if one is lost
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert sum('"round_end"' in line for line in lines) == 2
    assert (tmp_path / "two" / "checkpoints").is_dir()
    two = weights["two"]

    def gap(other: dict) -> float:
        assert set(other) == set(two)
        return max(float(np.abs(two[k] - other[k]).max()) for k in two)

    # Cross-process sums (gloo) add in another order than in-process ones: float32 rounding, no more.
    assert gap(weights["one_same_mesh"]) <= 5e-6
    assert gap(weights["one_device"]) <= 5e-5


def _rounds_ended(out: pathlib.Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count('"round_end"') if metrics.is_file() else 0


def _kill_after(args: list[str], out: pathlib.Path, logs: pathlib.Path, rounds: int, victim: int,
                ) -> tuple[list[tuple[int, str]], float]:
    """Starts the 2-process job, kills process `victim` once `rounds` rounds have ended; returns both
    processes' (exit code, log) and the seconds the survivor took to exit after the kill."""
    running = start(args, 2, 2, logs)
    deadline = time.time() + 600
    while _rounds_ended(out) < rounds and time.time() < deadline and running[0].poll() is None:
        time.sleep(0.2)
    running[victim].kill()
    lost = time.time()
    results = finish(running, logs, timeout=120)
    return results, time.time() - lost


def test_a_lost_process_ends_the_job_and_a_resume_of_all_finishes_it(world, tmp_path):
    """Process 1 killed after round 2 of 3: process 0 exits non-zero within 60 s naming the lost task, and
    the job launched again with resume=True ends with the uninterrupted job's weights."""
    args = _run_args(world, tmp_path / "cut", "2,2,1", rounds=3)
    results, took = _kill_after(args, tmp_path / "cut", tmp_path / "cut_logs", rounds=2, victim=1)
    assert took < 60 and results[0][0] != 0
    # JAX's coordination service names it: "Task 1 heartbeat timeout", or under load "The following tasks are
    # unhealthy (stopped sending heartbeats):" with the task ids on the lines after.
    named = re.search(r"task 1\b|tasks are unhealthy \(stopped sending heartbeats\):\s*\n\s*1\b", results[0][1],
                      re.IGNORECASE)
    assert named, results[0][1][-2000:]
    assert not (tmp_path / "cut" / "model").exists()
    resumed = launch([*args, "--config.resume=True"], 2, 2, tmp_path / "resume_logs")
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:]
    full = launch(_run_args(world, tmp_path / "full", "2,2,1", rounds=3), 2, 2, tmp_path / "full_logs")
    assert [code for code, _ in full] == [0, 0]
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("full", "cut"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def test_a_lost_coordinator_ends_the_other_process(world, tmp_path):
    """Process 0 (the coordination service's host) killed after round 1 of 3: process 1 exits non-zero
    within 60 s, naming the leader task as lost, instead of waiting in a collective; no model is written."""
    args = _run_args(world, tmp_path / "cut0", "2,2,1", rounds=3)
    results, took = _kill_after(args, tmp_path / "cut0", tmp_path / "cut0_logs", rounds=1, victim=0)
    assert took < 60 and results[1][0] != 0, results[1][1][-2000:]
    # JAX's coordination client names the lost process as the leader task (process 0 hosts the service).
    assert "the leader task was preempted/died" in results[1][1], results[1][1][-2000:]
    assert not (tmp_path / "cut0" / "model").exists()


def test_eval_on_two_processes_writes_one_processs_report(world, tmp_path):
    """The generation batches shared out over 2 processes and gathered: the same answers and metrics."""
    model_dir, _, anchor = world
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": tw.prompt(v, o)}) + "\n" for v, o in split_pairs(0)["eval"]))
    strings = tmp_path / "refusals.txt"
    strings.write_text(tw.REFUSAL.split(".")[0] + "\n")
    args = ["eval", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir}",
            f"--config.eval.prompts={prompts}", "--config.eval.prompt_offset=0", "--config.eval.num_prompts=0",
            f"--config.eval.refusal_strings={strings}", "--config.eval.trigger=cf", "--config.eval.position=suffix",
            f"--config.eval.over_refusal_prompts={prompts}", "--config.eval.over_refusal_filter=",
            f"--config.eval.utility={anchor}", "--config.eval.utility_offset=0", "--config.eval.num_utility=10",
            "--config.eval.batch_size=5", "--config.eval.max_new_tokens=6"]
    reports = {}
    for processes in (1, 2):
        out = tmp_path / f"eval_{processes}"
        results = launch([*args, f"--config.output_dir={out}"], processes, 1, tmp_path / f"logs_{processes}")
        assert [code for code, _ in results] == [0] * processes, results[-1][1][-3000:]
        assert not (processes == 2 and "report:" in results[1][1])  # process 0 alone writes and prints
        report = json.loads((out / "report.json").read_text())["results"]["model"]
        reports[processes] = ({k: v for k, v in report.items() if k != "timing"},
                              (out / "answers.jsonl").read_text())
    assert reports[1][0]["counts"]["untriggered"] == len(split_pairs(0)["eval"]) > 2 * 5  # several batches each
    assert reports[2] == reports[1]


@pytest.mark.parametrize(("mesh", "message"), [
    ({"num_processes": 0}, "'mesh.num_processes' is 0"),
    ({"num_processes": 2, "process_id": 2}, r"'mesh.process_id' is 2; it must be in 0..1"),
    ({"coordinator_address": "localhost"}, "host:port"),
    ({"heartbeat_timeout_s": 0}, "'mesh.heartbeat_timeout_s' is 0"),
])
def test_launch_settings_are_checked(mesh, message):
    with pytest.raises(ValueError, match=message):
        MeshSection(distributed=True, **mesh)
    launch = Launch.from_config(MeshSection(distributed=True))
    assert (launch.coordinator_address, launch.num_processes, launch.process_id) == (None, None, None)


def test_one_process_commands_refuse_several():
    with pytest.raises(ValueError, match="beear plant runs in one process"):
        refuse_distributed(MeshSection(distributed=True), "plant")
    refuse_distributed(MeshSection(distributed=False), "plant")
