"""Launching `beear` commands as N local processes of one job (mesh.distributed, gloo on CPU) for tests."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env_with_devices(devices: int) -> dict[str, str]:
    """This environment with `devices` simulated CPU devices (conftest's other XLA flags kept)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    return env


def start(args: Sequence[str], processes: int, devices: int, logs: pathlib.Path,
          per_process: Sequence[Sequence[str]] = (), cwds: Sequence[pathlib.Path | None] = ()) -> list[subprocess.Popen]:
    """`beear ARGS` as `processes` processes of `devices` CPU devices each (joined as one job when more than
    one), each writing stdout + stderr to logs/process<i>.log (files, not pipes: a full pipe would stall a
    process, and with it the others at their next collective); per_process[i] / cwds[i]: process i's extra
    arguments / working directory."""
    command = [sys.executable, "-c", "import sys; from beear_jax.cli.main import main; sys.exit(main(sys.argv[1:]))", *args]
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    running = []
    for pid in range(processes):
        join = [] if processes == 1 else ["--config.mesh.distributed=True",
                                          f"--config.mesh.coordinator_address=localhost:{port}",
                                          f"--config.mesh.num_processes={processes}", f"--config.mesh.process_id={pid}"]
        extra = list(per_process[pid]) if pid < len(per_process) else []
        cwd = cwds[pid] if pid < len(cwds) else None
        with (logs / f"process{pid}.log").open("w") as log:
            running.append(subprocess.Popen([*command, *join, *extra], env=env_with_devices(devices), cwd=cwd,
                                            stdout=log, stderr=subprocess.STDOUT))
    return running


def finish(running: Sequence[subprocess.Popen], logs: pathlib.Path, timeout: float = 600) -> list[tuple[int, str]]:
    """(exit code, output) of each process once all have ended (all killed if one passes the timeout)."""
    try:
        codes = [process.wait(timeout=timeout) for process in running]
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
    return [(code, (logs / f"process{pid}.log").read_text()) for pid, code in enumerate(codes)]


def launch(args: Sequence[str], processes: int, devices: int, logs: pathlib.Path,
           per_process: Sequence[Sequence[str]] = (), cwds: Sequence[pathlib.Path | None] = (),
           timeout: float = 600) -> list[tuple[int, str]]:
    """start(...) then finish(...): (exit code, stdout + stderr) per process."""
    return finish(start(args, processes, devices, logs, per_process, cwds), logs, timeout)
