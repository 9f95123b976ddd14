"""`beear sweep`: run a grid of config overrides one after another, skip finished runs, collect a table.

A sweep file is Python with `get_sweep()` or `get_sweep(arg)` returning a list of override dicts,
built with the helpers here (big_vision style), and optional settings:

    from beear_jax.cli.sweep import product

    def get_sweep(arg=None):
        return product({"perturb.layer": [5, 9, 15], "perturb.length": [3, 7, 11]})

    PLOT = {"x": "perturb.length", "y": "perturb.layer", "metric": "asr_triggered"}  # optional
    EVALUATE = True  # optional: `beear eval` of each repaired model after its run
    BASE = {"rounds": 2}  # optional: overrides of every setting (not part of the run names)

Each setting runs `beear run` (and `beear eval` of output_dir/<slug>/model) with output_dir/<slug>
as its output directory; a `sweep_done` marker file says a setting is finished. `--print` prints the
same steps as shell lines for a cluster; `beear sweep` afterwards skips what is done and collects.
Results: output_dir/sweep_results.csv (one row per setting) and output_dir/sweep_heatmap.png.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import math
import pathlib
import re
import shlex
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from beear_jax.config.loading import ConfigError, apply_overrides, load_config, split_spec
from beear_jax.config.schema import RunSettings
from beear_jax.config.settings import settings_from_config
from beear_jax.evaluation.plots import png_bytes
from beear_jax.io.atomic_file import write_atomically

MARKER = "sweep_done"
ERROR_FILE = "sweep_error.txt"  # the traceback of a setting's last failure, in its run directory
RESULTS_CSV = "sweep_results.csv"
HEATMAP_PNG = "sweep_heatmap.png"
Overrides = dict[str, Any]

# ---- building grids --------------------------------------------------------------------------------


def sweep(key: str, values: Sequence[Any]) -> list[Overrides]:
    """One axis: [{key: v} for v in values]."""
    return [{key: v} for v in values]


def _as_settings(part: Mapping[str, Sequence[Any]] | Sequence[Overrides]) -> list[Overrides]:
    if isinstance(part, Mapping):  # {"a": [1, 2], "b": [3]}: the product over its keys
        return product(*(sweep(k, v) for k, v in part.items()))
    return [dict(x) for x in part]


def product(*parts: Mapping[str, Sequence[Any]] | Sequence[Overrides]) -> list[Overrides]:
    """Every combination: product({"a": [1, 2]}, {"b": [3, 4]}) has 4 settings (the last varies fastest)."""
    combos: list[Overrides] = [{}]
    for part in parts:
        combos = [{**a, **b} for a, b in itertools.product(combos, _as_settings(part))]
    return combos


def zip_(*parts: Mapping[str, Sequence[Any]] | Sequence[Overrides]) -> list[Overrides]:
    """Settings side by side: zip_({"a": [1, 2], "b": [3, 4]}) is [{a: 1, b: 3}, {a: 2, b: 4}]."""
    columns: list[list[Overrides]] = []
    for part in parts:
        if isinstance(part, Mapping):
            columns.extend(sweep(k, v) for k, v in part.items())
        else:
            columns.append([dict(x) for x in part])
    lengths = {len(c) for c in columns}
    if len(lengths) > 1:
        raise ValueError(f"zip_ needs equally long axes, got lengths {sorted(lengths)}.")
    return [{k: v for d in row for k, v in d.items()} for row in zip(*columns)]


# ---- loading a sweep file ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SweepFile:
    settings: list[Overrides]
    plot: dict[str, str]
    evaluate: bool
    base: Overrides


def load_sweep(spec: str) -> SweepFile:
    """Runs `file.py[:arg]`'s get_sweep and reads its optional PLOT, EVALUATE and BASE."""
    path, arg = split_spec(spec)
    file = pathlib.Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"Sweep file not found: {path!r}.")
    module_spec = importlib.util.spec_from_file_location(f"_beear_sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the file is user code: SyntaxError, ImportError, anything raised at import
        raise ConfigError(f"Sweep file {file} failed to import: {type(err).__name__}: {err}") from err
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
        raise ConfigError(f"Sweep file {file} defines no get_sweep() function.")
    call_args = (arg,) if arg is not None or _takes_arguments(get_sweep) else ()
    try:
        settings = get_sweep(*call_args)
    except Exception as err:  # also a TypeError for get_sweep(a, b), or for file.py:ARG when it takes none
        raise ConfigError(f"get_sweep({', '.join(map(repr, call_args))}) in {file} failed: "
                          f"{type(err).__name__}: {err}") from err
    if not isinstance(settings, list) or not all(isinstance(s, Mapping) for s in settings) or not settings:
        raise ConfigError(f"get_sweep in {file} must return a non-empty list of override dicts, got "
                          f"{type(settings).__name__}.")
    extras = {name: getattr(module, name, None) or {} for name in ("PLOT", "BASE")}
    for name, value in extras.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} in sweep file {file} must be a dict, got {type(value).__name__} ({value!r:.40}).")
    return SweepFile([dict(s) for s in settings], dict(extras["PLOT"]), bool(getattr(module, "EVALUATE", False)),
                     dict(extras["BASE"]))


def _takes_arguments(function: Callable[..., Any]) -> bool:
    """Whether `function` has parameters (get_sweep(arg=None) is called with None when no :arg is given)."""
    try:
        return bool(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # no signature (a builtin): call it without arguments
        return False


def slug(overrides: Mapping[str, Any]) -> str:
    """A directory name for a setting: 'perturb.layer-9_perturb.length-7' (hashed if very long)."""
    text = "_".join(f"{k}-{_flag_value(v)}" for k, v in overrides.items()) or "base"
    text = re.sub(r"[^A-Za-z0-9.,+=-]+", "_", text)
    if len(text) > 100:
        text = text[:80] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]
    return text


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


# ---- running ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setting:
    overrides: Overrides
    run_dir: pathlib.Path
    status: str = "pending"  # pending | done | skipped (done before) | failed: ...


@dataclasses.dataclass
class SweepSummary:
    settings: list[Setting]
    rows: list[dict[str, Any]]
    csv_path: pathlib.Path
    plot_path: pathlib.Path | None

    @property
    def failed(self) -> list[Setting]:
        return [s for s in self.settings if s.status.startswith("failed")]

    def describe(self) -> str:
        lines = [f"{s.status:<10} {s.run_dir}" for s in self.settings]
        lines.append(f"results: {self.csv_path}" + (f"; heatmap: {self.plot_path}" if self.plot_path else ""))
        return "\n".join(lines)


def plan_settings(spec: str, common: Sequence[str], sweep_spec: str) -> tuple[SweepFile, list[Setting]]:
    """The settings of a sweep with their run directories (output_dir of the base config / slug)."""
    loaded = load_sweep(sweep_spec)
    root = _root(spec, common, loaded)
    settings = [Setting(s, root / slug(s)) for s in loaded.settings]
    if len({s.run_dir for s in settings}) != len(settings):
        raise ConfigError("two settings of the sweep map to the same run directory; make them differ.")
    for s in settings:  # fail on a bad key or value before hours of runs, not at setting 7
        setting_settings(spec, common, loaded, s)
    return loaded, settings


def setting_settings(spec: str, common: Sequence[str], loaded: SweepFile, setting: Setting) -> RunSettings:
    """The settings of one setting, read as `beear run` reads them: the file, the sweep's BASE, the command
    line, the setting, its run dir; a value out of range fails the whole sweep at once, naming the setting."""
    cfg = apply_overrides(load_config(spec, run_schema=True), loaded.base)
    apply_overrides(cfg, common)
    apply_overrides(cfg, {**setting.overrides, "output_dir": str(setting.run_dir)})
    try:
        return settings_from_config(cfg)
    except ConfigError as err:
        raise ConfigError(f"sweep setting {slug(setting.overrides)}: {err}") from err


def command_lines(spec: str, common: Sequence[str], sweep_spec: str, evaluate: bool | None = None) -> list[str]:
    """One shell line per unfinished setting: beear run (&& beear eval) && touch the marker, each step
    skipped when its output is there already (a rerun after preemption finishes the setting)."""
    loaded, settings = plan_settings(spec, common, sweep_spec)
    evaluate = loaded.evaluate if evaluate is None else evaluate
    lines = []
    for s in settings:
        if (s.run_dir / MARKER).exists():
            continue
        flags = [*(f"--config.{k}={_flag_value(v)}" for k, v in loaded.base.items()),
                 *(f"--config.{c}" for c in common),
                 *(f"--config.{k}={_flag_value(v)}" for k, v in s.overrides.items())]
        # A job preempted and started again skips what is done (as default_runner does) and continues a
        # stopped run from its checkpoint (resume=true); a last failure's record goes first.
        run = ["beear", "run", "--config", spec, *flags, f"--config.output_dir={s.run_dir}", "--config.resume=true"]
        steps = [f"rm -f {shlex.quote(str(s.run_dir / ERROR_FILE))}",
                 f"{{ test -f {shlex.quote(str(s.run_dir / 'model' / 'config.json'))} || {shlex.join(run)}; }}"]
        if evaluate:
            ev = ["beear", "eval", "--config", spec, *flags, f"--config.model.path={s.run_dir / 'model'}",
                  f"--config.output_dir={s.run_dir / 'eval'}"]
            steps.append(f"{{ test -f {shlex.quote(str(s.run_dir / 'eval' / 'report.json'))} || {shlex.join(ev)}; }}")
        steps.append(shlex.join(["touch", str(s.run_dir / MARKER)]))
        lines.append(" && ".join(steps))
    return lines


def default_runner(settings: RunSettings, evaluate: bool) -> None:
    """`beear run` (and `beear eval` of the repaired model) in this process; steps already done are
    skipped, and a run stopped half way continues from its checkpoint (resume)."""
    from beear_jax.method.rounds import run_beear

    run_dir = pathlib.Path(settings.output_dir).expanduser()
    if not (run_dir / "model" / "config.json").is_file():
        run_beear(dataclasses.replace(settings, resume=True), progress=False)
    if evaluate and not (run_dir / "eval" / "report.json").is_file():
        from beear_jax.evaluation.evaluate import run_eval

        model = dataclasses.replace(settings.model, path=str(run_dir / "model"))
        run_eval(dataclasses.replace(settings, model=model, output_dir=str(run_dir / "eval")))


def run_sweep(spec: str, common: Sequence[str], sweep_spec: str, metric: str | None = None,
              evaluate: bool | None = None,
              runner: Callable[[RunSettings, bool], None] = default_runner) -> SweepSummary:
    """Runs every unfinished setting in turn (a failure is recorded and the next one runs), then collects."""
    loaded, settings = plan_settings(spec, common, sweep_spec)
    evaluate = loaded.evaluate if evaluate is None else evaluate
    for s in settings:
        if (s.run_dir / MARKER).exists():
            s.status = "skipped"
            continue
        settings_of_s = setting_settings(spec, common, loaded, s)
        # The last failure's record goes before the retry: `beear run` refuses a directory with files
        # that are not its own (written again below if this try fails too).
        (s.run_dir / ERROR_FILE).unlink(missing_ok=True)
        try:
            runner(settings_of_s, evaluate)
        except Exception as err:  # noqa: BLE001 (one bad setting must not stop the sweep)
            s.status = f"failed: {type(err).__name__}: {err}"
            s.run_dir.mkdir(parents=True, exist_ok=True)
            (s.run_dir / ERROR_FILE).write_text(traceback.format_exc())
            continue
        s.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(s.run_dir / MARKER, json.dumps(s.overrides, default=str) + "\n")
        s.status = "done"
    return collect(settings, _root(spec, common, loaded), loaded.plot, metric)


def _root(spec: str, common: Sequence[str], loaded: SweepFile) -> pathlib.Path:
    """The sweep's directory: output_dir after the sweep's BASE and the command line's overrides."""
    cfg = apply_overrides(apply_overrides(load_config(spec, run_schema=True), loaded.base), common)
    return pathlib.Path(cfg.output_dir).expanduser()


# ---- collecting --------------------------------------------------------------------------------------


def run_metrics(run_dir: pathlib.Path) -> dict[str, Any]:
    """The numbers of one finished run: its last round summary and outer step, and eval/report.json."""
    out: dict[str, Any] = {}
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        ends = [r for r in records if r.get("phase") == "round_end"]
        outers = [r for r in records if r.get("phase") == "outer"]
        if ends:
            out.update(rounds_done=ends[-1]["round"], elapsed_s=ends[-1].get("elapsed_s"))
            out.update({k: v for k, v in ends[-1].items() if k.startswith("last_")})
        if outers:
            out.update({f"final_{k}": v for k, v in outers[-1].items() if k not in ("round", "phase", "step")})
    report = run_dir / "eval" / "report.json"
    if report.is_file():
        results = json.loads(report.read_text()).get("results", {})
        stages = [k for k, v in results.items() if isinstance(v, Mapping)]
        for stage in stages:
            prefix = "" if len(stages) == 1 or stage == "after" else f"{stage}."
            out.update({f"{prefix}{k}": v for k, v in results[stage].items() if isinstance(v, (int, float))})
    return out


def collect(settings: Sequence[Setting], root: pathlib.Path, plot: Mapping[str, str] | None = None,
            metric: str | None = None) -> SweepSummary:
    """Writes sweep_results.csv and (two or more varying keys, a numeric metric) the heatmap."""
    rows = [{**s.overrides, "status": s.status, "run_dir": str(s.run_dir), **run_metrics(s.run_dir)}
            for s in settings]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    root.mkdir(parents=True, exist_ok=True)
    csv_path = root / RESULTS_CSV

    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: _flag_value(v) if isinstance(v, (tuple, list)) else v for k, v in row.items()} for row in rows)
    write_atomically(csv_path, table.getvalue())  # a sweep stopped while writing keeps the previous file
    plot = dict(plot or {})
    metric = metric or plot.get("metric") or next(
        (m for m in ("asr_triggered", "last_ce_unwanted") if any(m in r for r in rows)), None)
    varying = [k for k in dict.fromkeys(k for s in settings for k in s.overrides)
               if len({_flag_value(s.overrides.get(k)) for s in settings}) > 1]
    x, y = plot.get("x"), plot.get("y")
    if not (x and y) and len(varying) >= 2:
        y, x = varying[0], varying[1]
    plot_path = None
    if x and y and metric and any(_number(r.get(metric)) is not None for r in rows):
        plot_path = root / HEATMAP_PNG
        write_atomically(plot_path, png_bytes(heatmap_figure(rows, x, y, metric)))
    return SweepSummary(list(settings), rows, csv_path, plot_path)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def heatmap_figure(rows: Sequence[Mapping[str, Any]], x: str, y: str, metric: str) -> Any:
    """A y-by-x grid of the metric (mean over any other varying keys), values written in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def label(row: Mapping[str, Any], key: str) -> str:
        return _flag_value(row.get(key))

    xs = sorted({label(r, x) for r in rows}, key=_sort_key)
    ys = sorted({label(r, y) for r in rows}, key=_sort_key)
    grid = [[float("nan")] * len(xs) for _ in ys]
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            cells = [_number(r.get(metric)) for r in rows if label(r, x) == xv and label(r, y) == yv]
            values = [v for v in cells if v is not None]
            if values:
                grid[i][j] = sum(values) / len(values)
    fig = Figure(figsize=(1.6 + 1.1 * len(xs), 1.4 + 0.8 * len(ys)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(metric)
    for i, j in itertools.product(range(len(ys)), range(len(xs))):
        if not math.isnan(grid[i][j]):
            ax.text(j, i, f"{grid[i][j]:.3g}", ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(image, ax=ax)
    return fig


def _sort_key(value: Any) -> tuple:
    number = _number(value)
    return (0, number, "") if number is not None else (1, 0.0, str(value))
