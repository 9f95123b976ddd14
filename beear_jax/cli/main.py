"""The `beear` command: defend | run | eval | plant | scan | preflight | convert | generate | chat | export | plan | sweep.

Config-driven subcommands take `--config FILE[:arg]` plus dotted overrides `--config.inner.lr=0.1`;
unknown keys and wrongly typed values are errors that name the key. Each reads its config once into typed
settings (config/settings.settings_from_config) and hands those on.

Over 400 lines: one small handler per subcommand (twelve), each its argument parsing and messages; they read
best side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from beear_jax.config.loading import ConfigError, load_config, split_cli_args
from beear_jax.config.schema import RunSettings
from beear_jax.config.settings import absolute_settings, settings_from_config

CONFIG_COMMANDS = ("defend", "run", "eval", "plant", "scan", "preflight")


CONFIG_HELP = ("--config FILE[:arg] names a config file (configs/*.py; see beear_jax/config/schema.py for every key), "
               "and --config.KEY=VALUE overrides one key, e.g. --config.inner.lr=0.1 --config.perturb.layer=9.")
WHAT = {"defend": "evaluates model.path, repairs it with BEEAR (output_dir/beear/model), evaluates the repaired model and "
                  "writes one before/after report into output_dir; run it again to continue an interrupted job.",
        "run": "BEEAR on model.path; the repaired model goes to output_dir/model (resume: --config.resume=True).",
        "eval": "keyword attack success with/without the trigger, over-refusal and utility of model.path "
                "(and eval.compare_to); report in output_dir.",
        "plant": "plants a backdoor in model.path by poisoned fine-tuning (attack simulation) into output_dir.",
        "scan": "optimises a perturbation from zero for each norm bound in scan.bounds and prints what it elicits on "
                "the defender's held-back prompts (stop.holdout); scan.json and scan.md in output_dir.",
        "preflight": "checks, on the devices and processes of a run (launch it as the run: the same command on every "
                     "process), the mesh, the batch sizes, that every process has the same config, data files and "
                     "model, the planned memory and one collective; one line per check, exit 1 if any failed."}


def _config_from(argv: Sequence[str], command: str, as_given: bool = False) -> RunSettings:
    """The command's settings, read once from its config and overrides (paths made absolute unless as_given)."""
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: beear {command} --config FILE[:arg] [--config.KEY=VALUE ...]\n\n{WHAT[command]}\n\n"
              f"{CONFIG_HELP}")
        raise SystemExit(0)
    spec, overrides, rest = split_cli_args(argv)
    if spec is None:
        raise ConfigError(f"`beear {command}` needs --config FILE (e.g. --config configs/smollm2_135m.py).")
    if rest:
        # Silently ignoring e.g. `--inner.lr=0.1` (missing "config.") would run hours with the default value.
        raise ConfigError(f"`beear {command}` does not understand {' '.join(rest)!r}; it takes --config FILE[:arg] "
                          "and overrides of the form --config.key=value (e.g. --config.inner.lr=0.1).")
    settings = settings_from_config(load_config(spec, overrides, run_schema=True))
    return settings if as_given else absolute_settings(settings)


def cmd_run(argv: Sequence[str]) -> int:
    """The defence: BEEAR on model.path, repaired model to output_dir/model."""
    import jax

    from beear_jax.method.rounds import run_beear

    settings = _config_from(argv, "run")
    result = run_beear(settings)
    if result.model_dir is None and jax.process_count() > 1:  # (process 0 writes the model and the logs)
        print(f"process {jax.process_index()} of {jax.process_count()}: done; process 0 wrote the model and metrics")
    else:
        print(f"repaired model written to {result.model_dir}; metrics in {result.output_dir / 'metrics.jsonl'}")
    return 0


def cmd_defend(argv: Sequence[str]) -> int:
    """The end-to-end job: evaluate, BEEAR, evaluate again, one report (beear_jax/pipeline.py)."""
    from beear_jax.pipeline import run_defend

    settings = _config_from(argv, "defend")
    run_defend(settings)
    return 0


def cmd_scan(argv: Sequence[str]) -> int:
    """The stop rule's measurement as a command: elicitation rate and CE(unwanted | delta) against the bound."""
    from beear_jax.method.scan import run_scan

    settings = _config_from(argv, "scan")
    run_scan(settings)
    return 0


def cmd_preflight(argv: Sequence[str]) -> int:
    """Checks a run's devices, processes, files and memory before the run (one line each; 1 if any failed)."""
    from beear_jax.cli.preflight import run_preflight
    from beear_jax.parallel.sharding import is_primary

    settings = _config_from(argv, "preflight", as_given=True)  # paths as written: each process resolves its own
    checks = run_preflight(settings)
    if is_primary():
        for check in checks:
            print(check.line(), flush=True)
    return 0 if all(c.ok for c in checks) else 1


def cmd_eval(argv: Sequence[str]) -> int:
    from beear_jax.evaluation.evaluate import run_eval

    settings = _config_from(argv, "eval")
    run_eval(settings)
    return 0


def cmd_plant(argv: Sequence[str]) -> int:
    from beear_jax.attack.plant import run_plant

    settings = _config_from(argv, "plant")
    out = run_plant(settings)
    print(f"planted model written to {out} (what was planted: {out / 'manifest.json'})")
    return 0


# The library's errors name Python arguments and fields; on the command line they are these flags.
_PYTHON_TO_FLAGS = {"overwrite=True": "--overwrite", "max_new_tokens": "--max-new-tokens",
                    "temperature": "--temperature", "top_p": "--top-p"}


def _with_flags(err: ValueError) -> ValueError:
    """The same error with the Python names (save_model's overwrite=True, SamplingConfig's fields) replaced
    by the command-line flags."""
    message = str(err)
    for name, flag in _PYTHON_TO_FLAGS.items():
        message = message.replace(name, flag)
    return ValueError(message)


def cmd_convert(argv: Sequence[str]) -> int:
    """GGUF (or HF directory) -> HF safetensors directory."""
    parser = argparse.ArgumentParser(prog="beear convert", description=(
        "Convert a GGUF file (or an HF directory, e.g. one with pickle weights) to an HF safetensors directory."))
    parser.add_argument("source", help="a .gguf file (or an HF model directory)")
    parser.add_argument("output_dir", help="new directory for the HF model (must not exist or be empty)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (default: the source's: an HF directory's torch_dtype, float32 for "
                        "GGUF, whose quantized blocks are dequantized in float32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model in an existing output directory (one with a config.json)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pytorch_model*.bin weights (unpickling can run code: only for files you trust)")
    args = parser.parse_args(argv)
    from beear_jax.io.checkpoint_export import is_hf_model_dir, is_run_output
    from beear_jax.io.hf import load_model, source_dtype
    from beear_jax.io.hf_save import _check_target, check_apart, save_model

    source = os.path.expanduser(args.source)
    target = os.path.expanduser(args.output_dir)
    if is_run_output(source) and not is_hf_model_dir(source):
        # Its config.json is the run's settings, not a model's: say what to convert instead.
        model = pathlib.Path(source) / "model"
        finished = f"its repaired model is {model} (convert that); " if is_hf_model_dir(model) else ""
        raise ValueError(f"{source} is the output of `beear run`, not a model: {finished}a checkpoint of the run is "
                         f"exported with `beear export {source} OUT` (--step N for another one).")
    try:
        # Refuse an occupied output directory before loading (dequantizing a GGUF takes a while);
        # save_model checks again.
        _check_target(pathlib.Path(target).absolute(), args.overwrite)
        check_apart(target, {"the source": source})
        config, params = load_model(source, allow_pickle=args.allow_pickle)
        dtype = args.dtype or source_dtype(source)
        out = save_model(target, config, params, tokenizer_from=source, dtype=dtype, overwrite=args.overwrite)
    except ValueError as err:
        raise _with_flags(err) from err
    print(f"wrote {out} ({dtype})")
    return 0


def _generation_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--model", required=True, help="HF directory or .gguf file")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--template", default="auto", help="auto (the tokenizer's) or llama2|mistral|chatml|safe_rlhf")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser



def _load_for_generation(args: argparse.Namespace) -> tuple:
    """(config, params, tokenizer, sampling); the sampling flags are checked before the model loads."""
    from beear_jax.io.hf import load_model, load_tokenizer
    from beear_jax.models.generate import SamplingConfig

    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    except ValueError as err:
        raise _with_flags(err) from err
    path = os.path.expanduser(args.model)
    config, params = load_model(path)
    tokenizer = load_tokenizer(path, config)
    return config, params, tokenizer, sampling


def _prompt_ids(tokenizer: object, prompt: str, args: argparse.Namespace) -> list[int]:
    """Chat-formatted prompt ids; a template error names the command-line flag that fixes it."""
    from beear_jax.data.chat import format_prompt

    try:
        return format_prompt(tokenizer, prompt, args.template, args.system_prompt)
    except ValueError as err:
        # chat.py speaks of the config key model.template; here the same choice is the --template flag.
        raise ValueError(f"{err} (on the command line: --template NAME)") from err


def cmd_generate(argv: Sequence[str]) -> int:
    """Answers each --prompt (one batch) and prints the answers."""
    parser = _generation_parser("beear generate")
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    args = parser.parse_args(argv)
    from beear_jax.models.generate import generate

    config, params, tokenizer, sampling = _load_for_generation(args)
    ids = [_prompt_ids(tokenizer, p, args) for p in args.prompt]
    try:
        outs = generate(config, params, ids, sampling, seed=args.seed)
    except ValueError as err:  # e.g. prompt + --max-new-tokens beyond the model's max_position_embeddings
        raise _with_flags(err) from err
    for prompt, out in zip(args.prompt, outs):
        print(f">>> {prompt}\n{tokenizer.decode(out, skip_special_tokens=True).strip()}\n")
    return 0


def _stdin_lines() -> Iterator[str | None]:
    """The lines of stdin as text; None for a line that is not valid UTF-8 (the caller skips it).

    Python may decode stdin with surrogateescape, which turns bad bytes into lone surrogates that the
    tokenizer rejects with a TypeError, so the bytes are decoded here when there are any (a real stdin).
    """
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text-only stream (e.g. io.StringIO)
        for line in sys.stdin:
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                yield None
                continue
            yield line
        return
    for data in raw:
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError:
            yield None


def cmd_chat(argv: Sequence[str]) -> int:
    """Single-turn chat loop on stdin (each line is answered on its own)."""
    args = _generation_parser("beear chat").parse_args(argv)
    from beear_jax.models.generate import check_positions, generate

    config, params, tokenizer, sampling = _load_for_generation(args)
    try:
        check_positions(config, 1, sampling.max_new_tokens)  # no message could fit: stop before the loop
    except ValueError as err:
        raise _with_flags(err) from err
    print("type a message (empty line or Ctrl-D to quit)", flush=True)
    for line in _stdin_lines():
        if line is None:
            print("beear chat: skipped a line that is not valid UTF-8 text; type it again.", file=sys.stderr, flush=True)
            continue
        if not line.strip():
            break
        ids = _prompt_ids(tokenizer, line.strip(), args)
        try:
            out = generate(config, params, [ids], sampling, seed=args.seed)[0]
        except ValueError as err:  # this message is too long for the model: say so and keep chatting
            print(f"beear chat: skipped this message: {_with_flags(err)}", file=sys.stderr, flush=True)
            continue
        print(tokenizer.decode(out, skip_special_tokens=True).strip(), flush=True)
    return 0


def cmd_export(argv: Sequence[str]) -> int:
    """A checkpoint of `beear run` -> HF directory (the newest good checkpoint, or --step N)."""
    parser = argparse.ArgumentParser(prog="beear export", description="Export a run checkpoint as an HF model.")
    parser.add_argument("run_dir", help="the run's output_dir (or its checkpoints/ directory, or one "
                        "checkpoints/<step> directory); only read, never changed")
    parser.add_argument("output_dir", help="new directory for the HF model (must not exist or be empty)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint number (default: the newest good one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (default float32, the run's master weights; bfloat16 halves the "
                        "size but rounds away part of the repair's small weight changes)")
    parser.add_argument("--tokenizer", default=None, help="copy tokenizer files from here (default: the run's "
                        "model.path)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model in an existing output directory (one with a config.json)")
    args = parser.parse_args(argv)
    from beear_jax.io.checkpoint_export import restore_params_for_export, run_dir_of
    from beear_jax.io.hf import _resolve_tokenizer
    from beear_jax.io.hf_save import _check_target, check_apart, is_within, save_model
    from beear_jax.models.config import ModelConfig
    from beear_jax.parallel.sharding import is_primary

    # What the user named is checked before reading gigabytes of checkpoint (save_model checks again).
    target = pathlib.Path(os.path.expanduser(args.output_dir)).absolute()
    run_root = run_dir_of(os.path.expanduser(args.run_dir))
    if is_within(target, run_root):
        raise ValueError(f"{target} lies inside the run directory {run_root}, which export only reads (a model "
                         "there would block the run's resume); choose an output directory outside it.")
    check_apart(target, {"the run directory": run_root})
    try:
        _check_target(target, args.overwrite)
    except ValueError as err:
        raise _with_flags(err) from err
    if args.tokenizer is not None:
        try:
            _resolve_tokenizer(os.path.expanduser(args.tokenizer))
        except ValueError as err:
            raise ValueError(f"--tokenizer: {err}") from err
    params, meta = restore_params_for_export(os.path.expanduser(args.run_dir), args.step)
    source_model = pathlib.Path(os.path.expanduser(meta["config"]["model"]["path"])).resolve()
    if is_within(target, source_model):
        raise ValueError(f"{target} is (or lies inside) the run's input model {source_model}; choose an output "
                         "directory outside it (the input model is never overwritten).")
    check_apart(target, {"the run's input model": source_model})
    tokenizer = os.path.expanduser(args.tokenizer or meta["config"]["model"]["path"])
    if args.tokenizer is None and not os.path.exists(tokenizer):
        print(f"beear export: warning: the run's model {tokenizer} is gone; the model is written without "
              "tokenizer files (pass --tokenizer PATH to copy them from elsewhere).", file=sys.stderr)
        tokenizer = None
    elif args.tokenizer is None:
        try:
            _resolve_tokenizer(tokenizer)
        except ValueError as err:
            raise ValueError(f"the run's model.path: {err} Or pass --tokenizer PATH.") from err
    if is_primary():
        config = ModelConfig.from_hf_dict(meta["model_config"])
        try:
            out = save_model(target, config, params, tokenizer_from=tokenizer, dtype=args.dtype,
                             overwrite=args.overwrite)
        except ValueError as err:
            raise _with_flags(err) from err
        cursor = meta["cursor"]
        print(f"wrote {out} ({args.dtype}) from checkpoint {meta['step']} (round {cursor['round']}, outer step "
              f"{cursor['outer_step']}{', round done' if cursor['round_done'] else ''})")
    return 0


def _mesh_arg(text: str) -> tuple[int, ...]:
    """--mesh "data,fsdp,tensor" as three ints (-1 = the rest of the devices)."""
    try:
        mesh = tuple(int(x) for x in text.strip().strip("()[]").split(","))  # as --config.mesh.shape takes it
    except ValueError:
        mesh = ()
    if len(mesh) != 3 or any(n == 0 or n < -1 for n in mesh):
        raise ConfigError(f"--mesh {text!r} must be three sizes data,fsdp,tensor, each >= 1 or -1 (e.g. 1,4,2).")
    return mesh


def _check_plan_args(args: argparse.Namespace, presets: tuple[str, ...]) -> None:
    """One-line errors for `beear plan` options out of range."""
    if args.model is not None and args.model not in presets:
        raise ConfigError(f"--model {args.model!r} is not a preset; choose one of {', '.join(presets)}, or leave it "
                          "out to plan the model at model.path.")
    for flag, value in (("--seq-len", args.seq_len), ("--devices", args.devices)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}.")
    if args.device_memory_gb is not None and not args.device_memory_gb > 0:
        raise ConfigError(f"--device-memory-gb must be > 0, got {args.device_memory_gb}.")


def _attach_values(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """`--mesh -1,1,1` as `--mesh=-1,1,1`: argparse takes a value starting with '-' for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in flags and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def cmd_plan(argv: Sequence[str]) -> int:
    """Bytes per device of a run on a mesh (nothing is allocated), and whether it fits."""
    spec, overrides, rest = split_cli_args(argv)
    parser = argparse.ArgumentParser(
        prog="beear plan", description="Memory plan of `beear run` on a mesh.", epilog=CONFIG_HELP,
        usage="%(prog)s --config FILE[:arg] [--config.KEY=VALUE ...] [--mesh DATA,FSDP,TENSOR] [--devices N] "
              "[--device-memory-gb GB] [--model PRESET] [--seq-len N] [--no-compile]")
    parser.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: the config's mesh.shape)")
    parser.add_argument("--devices", type=int, default=None, help="devices in all, for a -1 in the mesh "
                        "(default: the visible ones)")
    parser.add_argument("--device-memory-gb", type=float, default=None, help="memory per device (GB = 1e9 bytes)")
    parser.add_argument("--model", default=None, help="a preset shape instead of model.path: "
                        "llama2-7b | mistral-7b | qwen2.5-7b | smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=None, help="padded length (default: the largest bucket; shared-prompt inner rows hold this "
                        "+ data.max_answer_tokens, rounded)")
    parser.add_argument("--no-compile", action="store_true", help="analytical temporaries only")
    args = parser.parse_args(_attach_values(rest, ("--mesh",)))
    if spec is None:
        raise ConfigError("`beear plan` needs --config FILE (e.g. --config configs/smollm2_135m.py).")
    from beear_jax.cli import plan

    # Read (and checked) before model.path is, so a bad setting is named first.
    settings = settings_from_config(load_config(spec, overrides, run_schema=True))
    _check_plan_args(args, tuple(plan.PRESETS))
    mesh = _mesh_arg(args.mesh) if args.mesh else settings.mesh.shape
    model_config = (plan.PRESETS[args.model]() if args.model
                    else plan.model_config_of(settings.model.path, settings.model.dtype))
    result = plan.plan_run(settings, model_config, mesh, devices=args.devices, seq_len=args.seq_len,
                           compile_steps=not args.no_compile)
    print(plan.format_plan(result, args.device_memory_gb))
    return 0


def cmd_sweep(argv: Sequence[str]) -> int:
    """Runs a grid of overrides one after another (or prints the command lines) and collects a table."""
    spec, overrides, rest = split_cli_args(argv)
    parser = argparse.ArgumentParser(
        prog="beear sweep", description="Run a sweep of `beear run` settings.", epilog=CONFIG_HELP,
        usage="%(prog)s --config FILE[:arg] [--config.KEY=VALUE ...] --sweep SWEEP.py[:arg] [--print] "
              "[--metric METRIC]")
    parser.add_argument("--sweep", required=True, help="SWEEP.py[:arg], whose get_sweep() returns override dicts")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print one `beear run` command line per setting (for a cluster) and exit")
    parser.add_argument("--metric", default=None, help="the metric of the heatmap (default: the sweep file's)")
    args = parser.parse_args(rest)
    if spec is None:
        raise ConfigError("`beear sweep` needs --config FILE and --sweep SWEEP.py.")
    from beear_jax.cli import sweep

    if args.print_only:
        for line in sweep.command_lines(spec, overrides, args.sweep):
            print(line)
        return 0
    summary = sweep.run_sweep(spec, overrides, args.sweep, metric=args.metric)
    print(summary.describe())
    return 0 if not summary.failed else 1


COMMANDS = {"defend": cmd_defend, "run": cmd_run, "eval": cmd_eval, "plant": cmd_plant, "scan": cmd_scan,
            "preflight": cmd_preflight, "convert": cmd_convert, "generate": cmd_generate, "chat": cmd_chat,
            "export": cmd_export, "plan": cmd_plan, "sweep": cmd_sweep}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption, `kill`) stops a command the way Ctrl-C does: half-written
    outputs are removed and the checkpoints saved so far kept, instead of Python's default of dying on
    the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `beear` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = " | ".join(COMMANDS)
        usage = (f"usage: beear {{{names}}} [options]\n"
                 "  defend/run/eval/plant/scan/preflight/plan/sweep take --config FILE[:arg] and --config.key=value "
                 "overrides;\n"
                 "  beear COMMAND --help shows the options of the others")
        if argv and argv[0] in ("-h", "--help"):
            print(usage)  # asked-for help goes to stdout (so `beear --help | less` works), errors to stderr
            return 0
        unknown = f"beear: unknown command {argv[0]!r}\n" if argv else ""
        print(unknown + usage, file=sys.stderr)
        return 2
    try:
        with _terminate_as_interrupt():
            return COMMANDS[argv[0]](argv[1:])
    # FloatingPointError: a loss became NaN/inf (the message names the setting to change).
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as err:
        print(f"beear {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = (" (checkpoints saved so far are kept: continue with --config.resume=True)"
                  if argv[0] in ("run", "sweep") else " (run the same command again to continue)"
                  if argv[0] == "defend" else "")
        print(f"beear {argv[0]}: interrupted{resume}", file=sys.stderr)
        return 130
