"""The `beear` command as a user meets it: convert, generate, help, and the mistakes a new user makes.

Bad input must end with exit code 1 and a message on stderr that names the problem (never a traceback),
and must leave existing files untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from hf_fixtures import make_tiny_hf_model, make_tiny_tokenizer

import beear_jax
from beear_jax.cli.main import main

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.py"

# make_tiny_tokenizer's template ignores add_generation_prompt, so the answer boundary cannot be found in
# it; a chat model's template adds the assistant header when asked, as this one does.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random Llama HF directory with a word-level tokenizer that has a proper chat template."""
    directory, _ = make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), "llama_gqa")
    tokenizer = make_tiny_tokenizer(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def _digest(directory: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under directory, by relative path."""
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file()}


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """Runs main(argv), expects exit code 1 and stderr containing every needle; returns stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in stderr: {err}"
    return err


# ---- what works --------------------------------------------------------------------------------------------


def test_convert_hf_dir_loads_with_identical_params(tiny_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(tiny_dir), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    src_config, src_params = beear_jax.load_model(tiny_dir)
    out_config, out_params = beear_jax.load_model(out)
    assert out_config == src_config
    assert jax.tree.structure(out_params) == jax.tree.structure(src_params)
    for a, b in zip(jax.tree.leaves(src_params), jax.tree.leaves(out_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_prints_answers(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "w5 w6 w7", "--prompt", "w9", "--max-new-tokens", "6"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    blocks = [b for b in out.split(">>> ") if b.strip()]
    assert [b.splitlines()[0] for b in blocks] == ["w5 w6 w7", "w9"]
    # the tiny vocabulary is w0..w123 plus specials (skipped when decoding): the answers are such words
    answers = [b.splitlines()[1] if len(b.splitlines()) > 1 else "" for b in blocks]
    assert any(answers), out
    assert all(word.startswith("w") for a in answers for word in a.split()), answers


def test_python_m_help():
    done = subprocess.run([sys.executable, "-m", "beear_jax", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage: beear" in done.stdout
    for command in ("run", "convert", "generate"):
        assert command in done.stdout


def test_no_or_unknown_command_shows_usage(capsys):
    assert main([]) == 2
    assert "usage: beear" in capsys.readouterr().err
    assert main(["conver", "a", "b"]) == 2
    assert "unknown command 'conver'" in capsys.readouterr().err


# ---- bad input, as a new user would try it ------------------------------------------------------------------


def test_convert_missing_path(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    _fails(capsys, ["convert", str(missing), str(tmp_path / "out")], "no such file or directory", str(missing))
    assert not (tmp_path / "out").exists()


def test_generate_missing_model(tmp_path, capsys):
    _fails(capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"], "no such file or directory")


def test_convert_directory_without_config(tmp_path, capsys):
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "README.md").write_text("not a model\n")
    _fails(capsys, ["convert", str(tmp_path / "weights_only"), str(tmp_path / "out")], "no config.json")


def test_convert_gpt2_config(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                  "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}))
    _fails(capsys, ["convert", str(gpt2), str(tmp_path / "out")], "gpt2", "unsupported architecture")


def test_convert_truncated_safetensors(tiny_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    _fails(capsys, ["convert", str(broken), str(tmp_path / "out")], "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_existing_model_dir(tiny_dir, tmp_path, capsys):
    out = tmp_path / "existing"
    other, _ = make_tiny_hf_model(tmp_path / "other", "llama_untied_bias", seed=3)
    shutil.copytree(other, out)
    before, siblings = _digest(out), sorted(p.name for p in tmp_path.iterdir())
    _fails(capsys, ["convert", str(tiny_dir), str(out)], "already exists", "--overwrite")
    assert _digest(out) == before, "the existing model was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings, "a temporary directory was left behind"


def test_convert_overwrite_replaces_a_model_dir(tiny_dir, tmp_path, capsys):
    out = tmp_path / "existing"
    other, _ = make_tiny_hf_model(tmp_path / "other", "llama_untied_bias", seed=3)
    shutil.copytree(other, out)
    assert main(["convert", str(tiny_dir), str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert beear_jax.load_model(out)[0] == beear_jax.load_model(tiny_dir)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "other"]


def test_convert_keeps_the_source_dtype(tiny_dir, tmp_path, capsys):
    half = tmp_path / "half"
    assert main(["convert", "--dtype", "bfloat16", str(tiny_dir), str(half)]) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    again = tmp_path / "again"
    assert main(["convert", str(half), str(again)]) == 0  # no --dtype: the source's
    assert "(bfloat16)" in capsys.readouterr().out
    assert json.loads((again / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (again / "model.safetensors").stat().st_size == (half / "model.safetensors").stat().st_size


def test_convert_and_export_name_the_right_command_for_a_run_or_a_model(tiny_dir, tmp_path, capsys):
    """A run's output_dir (whose config.json holds run settings) or checkpoint is not a model for convert; an HF
    model directory is not a run for export: each error names the command and path that work."""
    run = tmp_path / "run"
    (run / "checkpoints" / "4" / "meta").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"round": 1, "phase": "round_end"}\n')
    (run / "config.json").write_text('{"model": {"path": "/m"}, "rounds": 3}')
    shutil.copytree(tiny_dir, run / "model")
    out = tmp_path / "out"
    _fails(capsys, ["convert", str(run), str(out)], "is the output of `beear run`", f"{run / 'model'} (convert that)",
           f"beear export {run} OUT")
    for path in (run / "checkpoints", run / "checkpoints" / "4"):
        _fails(capsys, ["convert", str(path), str(out)], "is the output of `beear run`", "beear export")
    _fails(capsys, ["export", str(tiny_dir), str(out)], "is an HF model directory, not a run",
           f"beear convert {tiny_dir} OUT")
    assert not out.exists()
    assert main(["convert", str(run / "model"), str(out)]) == 0  # the run's own model converts as any model


def test_convert_overwrite_never_replaces_its_source(tiny_dir, tmp_path, capsys):
    base, _ = make_tiny_hf_model(tmp_path / "user", "llama_untied_bias", seed=3)
    make_tiny_tokenizer(base)
    inner = base / "finetuned"
    shutil.copytree(tiny_dir, inner)
    before = _digest(base)
    _fails(capsys, ["convert", "--overwrite", str(base), str(base)], "is, lies inside or contains the source")
    _fails(capsys, ["convert", "--overwrite", str(inner), str(base)], "is, lies inside or contains the source")
    assert _digest(base) == before


def test_sigterm_stops_a_command_like_ctrl_c(monkeypatch, capsys):
    def slow(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        return 0

    monkeypatch.setitem(beear_jax.cli.main.COMMANDS, "convert", slow)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["convert"]) == 130
    assert "beear convert: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is previous


def test_generate_template_error_names_the_flag(tiny_dir, tmp_path, capsys):
    model = tmp_path / "no_gen_prompt"
    shutil.copytree(tiny_dir, model)
    make_tiny_tokenizer(model)  # its template ignores add_generation_prompt
    _fails(capsys, ["generate", "--model", str(model), "--prompt", "w5"], "cannot mark where the answer starts",
           "--template")


def test_run_without_config(capsys):
    _fails(capsys, ["run"], "needs --config")


def test_run_unknown_override_key_is_named(capsys):
    _fails(capsys, ["run", "--config", str(TINY_CONFIG), "--config.inner.lrr=1"], "inner.lrr", "inner.lr")


def test_run_rejects_stray_arguments(capsys):
    # "--inner.lr" without the "config." prefix would otherwise be ignored and the run use the default lr
    _fails(capsys, ["run", "--config", str(TINY_CONFIG), "--inner.lr=1"], "--inner.lr=1", "--config.key=value")


@pytest.mark.parametrize(("command", "override", "needles"), [
    ("run", "remat=fast", ["'remat' is 'fast'", "'dots'"]),
    ("run", "outer.remat=fast", ["'outer.remat' is 'fast'", "'dots'"]),
    ("plan", "outer.remat=fast", ["'outer.remat' is 'fast'"]),
    ("run", "rounds=0", ["'rounds' is 0", ">= 1"]),
    ("run", "inner.batch_size=0", ["'inner.batch_size' is 0", "--config.inner.batch_size"]),
    ("run", "outer.anchor_samples=-1", ["'outer.anchor_samples' is -1", ">= 0"]),
    ("run", "perturb.length=0", ["'perturb.length' is 0"]),
    ("run", "outer.lr=-1e-5", ["'outer.lr' is -1e-05", "> 0"]),
    ("run", "inner.lr=nan", ["'inner.lr' is nan", "finite"]),
    ("run", "inner.alpha=-0.1", ["'inner.alpha'", ">= 0"]),
    ("run", "inner.safe_ce_clamp=nan", ["'inner.safe_ce_clamp' is nan", "finite", "--config.inner.safe_ce_clamp"]),
    ("run", "inner.target_ce=inf", ["'inner.target_ce' is inf", "finite"]),
    ("run", "inner.bound=nan", ["'inner.bound' is nan", "finite"]),
    ("run", "stop.max_elicitation=1.5", ["'stop.max_elicitation' is 1.5", "0..1"]),
    ("run", "stop.holdout=-1", ["'stop.holdout' is -1", ">= 0"]),
    ("run", "stop.max_elicitation=0.1", ["stop.holdout is 0", "--config.stop.holdout=N"]),
    ("run", "inner.patience=-2", ["'inner.patience' is -2"]),
    ("run", "outer.clip_norm=-1", ["'outer.clip_norm'", ">= 0"]),
    ("run", "outer.lr_schedule=step", ["'outer.lr_schedule' is 'step'", "cosine"]),
    ("run", "checkpoint_keep=0", ["'checkpoint_keep' is 0"]),
    ("run", "data.buckets=()", ["'data.buckets'", "--config.data.buckets"]),
    ("run", "perturb.layers=a,b", ["perturb.layers", "layer indices"]),
    ("run", "model.template=foo", ["'model.template' is 'foo'", "chatml"]),
    ("run", "inner.optimizer=adamx", ["'inner.optimizer'", "unknown optimizer 'adamx'"]),
    ("plan", "outer.optimizer=adamx", ["'outer.optimizer'", "unknown optimizer 'adamx'"]),
    ("run", "outer.trainable=(((", ["'outer.trainable'", "regular expression"]),
    ("plant", "plant.lr=0", ["'plant.lr' is 0"]),
    ("plant", "plant.harmful_offset=-3", ["'plant.harmful_offset' is -3"]),
    ("plant", "plant.n_triggered=-5", ["'plant.n_triggered' is -5"]),
])
def test_bad_run_settings_are_named_before_loading(tmp_path, capsys, command, override, needles):
    # The model path does not exist: the settings are checked first, so the error names the key.
    argv = [command, "--config", str(TINY_CONFIG), f"--config.{override}", f"--config.model.path={tmp_path / 'none'}",
            f"--config.output_dir={tmp_path / 'out'}"]
    _fails(capsys, argv, *needles)


@pytest.mark.parametrize("command", ["run", "plant"])
def test_empty_model_path_is_named(tmp_path, capsys, command):
    _fails(capsys, [command, "--config", str(TINY_CONFIG), f"--config.output_dir={tmp_path / 'out'}"],
           "model.path is empty", "--config.model.path")


def test_a_config_without_the_default_keys_is_named(tmp_path, capsys):
    partial = tmp_path / "partial.py"
    partial.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'seed': 0})\n")
    _fails(capsys, ["run", "--config", str(partial)], "lacks the key(s)", "base_config()")


@pytest.mark.parametrize("command", ["run", "eval", "plant"])
def test_config_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--config FILE[:arg]" in capsys.readouterr().out


def test_run_missing_config_file(tmp_path, capsys):
    _fails(capsys, ["run", "--config", str(tmp_path / "nope.py")], "nope.py")


# ---- GGUF -> HF (real weights) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_gguf_transformers_reloads_same_logits(smollm2_gguf, smollm2_reference, tmp_path, capsys):
    """GGUF (given as a directory holding one .gguf) -> HF directory: transformers reloads it with the logits of
    its own GGUF import, ties the embeddings as the file does, and keeps the tokenizer and chat template."""
    import torch
    import transformers
    from safetensors import safe_open

    from beear_jax.io.hf import load_tokenizer

    source = tmp_path / "gguf_dir"
    source.mkdir()
    (source / smollm2_gguf.name).symlink_to(smollm2_gguf)
    out = tmp_path / "smollm2-hf"
    assert main(["convert", str(source), str(out)]) == 0
    capsys.readouterr()
    hf_config = json.loads((out / "config.json").read_text())
    sizes = ("num_hidden_layers", "hidden_size", "num_key_value_heads", "tie_word_embeddings")
    assert [hf_config[k] for k in sizes] == [30, 576, 3, True]
    with safe_open(str(out / "model.safetensors"), "np") as weights:
        stored = list(weights.keys())
    assert "lm_head.weight" not in stored, "tied embeddings were written twice"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    prompt = "The capital of France is"
    assert tokenizer(prompt).input_ids == load_tokenizer(smollm2_gguf)(prompt).input_ids
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template, \
        "the GGUF's chat template was not carried into the HF directory"
    ids = torch.tensor([[1, 9690, 198, 2683, 3460, 314, 260, 3575, 282, 4649, 47, 2, 198, 1]])
    with torch.no_grad():
        want = smollm2_reference(input_ids=ids).logits.numpy()
        converted = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        got = converted(input_ids=ids).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4
