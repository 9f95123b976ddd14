"""Entry points: the `beear` command, sweeps, the memory planner, the multi-process preflight."""
