"""The `beear` command: run | eval | plant | convert | generate | chat (config-driven where it matters).

Config-driven subcommands take `--config FILE[:arg]` plus dotted overrides `--config.inner.lr=0.1`;
unknown keys and wrongly typed values are errors that name the key.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from beear_jax.config_loading import ConfigError, load_config, split_cli_args

CONFIG_COMMANDS = ("run", "eval", "plant")


def _config_from(argv: Sequence[str], command: str) -> tuple[object, list[str]]:
    spec, overrides, rest = split_cli_args(argv)
    if spec is None:
        raise ConfigError(f"`beear {command}` needs --config FILE (e.g. --config configs/smollm2_135m.py).")
    return load_config(spec, overrides), rest


def cmd_run(argv: Sequence[str]) -> int:
    """The defence: BEEAR on cfg.model.path, repaired model to cfg.output_dir/model."""
    from beear_jax.beear import run_beear

    cfg, _ = _config_from(argv, "run")
    result = run_beear(cfg)
    print(f"repaired model written to {result.model_dir}; metrics in {result.output_dir / 'metrics.jsonl'}")
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    from beear_jax.evaluation import run_eval

    cfg, _ = _config_from(argv, "eval")
    run_eval(cfg)
    return 0


def cmd_plant(argv: Sequence[str]) -> int:
    from beear_jax.backdoor import run_plant

    cfg, _ = _config_from(argv, "plant")
    run_plant(cfg)
    return 0


def cmd_convert(argv: Sequence[str]) -> int:
    """GGUF (or HF directory) -> HF safetensors directory."""
    parser = argparse.ArgumentParser(prog="beear convert", description="Convert a GGUF file to an HF directory.")
    parser.add_argument("source", help="a .gguf file (or an HF model directory)")
    parser.add_argument("output_dir", help="new directory for the HF model (must not exist or be empty)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    from beear_jax.hf import load_model, save_model

    source = os.path.expanduser(args.source)
    config, params = load_model(source)
    out = save_model(os.path.expanduser(args.output_dir), config, params, tokenizer_from=source, dtype=args.dtype)
    print(f"wrote {out}")
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
    from beear_jax.generate import SamplingConfig
    from beear_jax.hf import load_model, load_tokenizer

    path = os.path.expanduser(args.model)
    config, params = load_model(path)
    tokenizer = load_tokenizer(path)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    return config, params, tokenizer, sampling


def cmd_generate(argv: Sequence[str]) -> int:
    """Answers each --prompt (one batch) and prints the answers."""
    parser = _generation_parser("beear generate")
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    args = parser.parse_args(argv)
    from beear_jax.chat import format_prompt
    from beear_jax.generate import generate

    config, params, tokenizer, sampling = _load_for_generation(args)
    ids = [format_prompt(tokenizer, p, args.template, args.system_prompt) for p in args.prompt]
    for prompt, out in zip(args.prompt, generate(config, params, ids, sampling, seed=args.seed)):
        print(f">>> {prompt}\n{tokenizer.decode(out, skip_special_tokens=True).strip()}\n")
    return 0


def cmd_chat(argv: Sequence[str]) -> int:
    """Single-turn chat loop on stdin (each line is answered on its own)."""
    args = _generation_parser("beear chat").parse_args(argv)
    from beear_jax.chat import format_prompt
    from beear_jax.generate import generate

    config, params, tokenizer, sampling = _load_for_generation(args)
    print("type a message (empty line or Ctrl-D to quit)")
    for line in sys.stdin:
        if not line.strip():
            break
        ids = format_prompt(tokenizer, line.strip(), args.template, args.system_prompt)
        out = generate(config, params, [ids], sampling, seed=args.seed)[0]
        print(tokenizer.decode(out, skip_special_tokens=True).strip())
    return 0


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "plant": cmd_plant, "convert": cmd_convert,
            "generate": cmd_generate, "chat": cmd_chat}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `beear` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = " | ".join(COMMANDS)
        print(f"usage: beear {{{names}}} [options]\n"
              "  run/eval/plant take --config FILE[:arg] and --config.key=value overrides", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"beear {argv[0]}: error: {err}", file=sys.stderr)
        return 1
