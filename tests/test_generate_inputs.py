"""Bad generation / forward inputs give one clear ValueError (CLI: one error line, exit code 1), never a
traceback, a silent clamp or a run that cannot finish: sampling settings, prompt + new tokens beyond the
model's positions, undecodable chat input, and the shapes / dtypes / id range of forward's arrays."""

from __future__ import annotations

import io
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_world as tw

import beear_jax
from beear_jax.cli import main
from beear_jax.generate import SamplingConfig, check_positions, generate
from beear_jax.hf import save_model
from beear_jax.models import llama
from beear_jax.models.weights import init_params

MAX_POSITIONS = 48


@pytest.fixture(scope="module")
def small() -> tuple:
    """(config, params) of a 2-layer random model with only MAX_POSITIONS positions."""
    config = tw.tiny_config(64).replace(num_layers=2, max_position_embeddings=MAX_POSITIONS)
    return config, init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    """The same kind of model as an HF directory with the tiny-world tokenizer (and chat template)."""
    tmp = tmp_path_factory.mktemp("gen_inputs")
    tok = tw.make_tokenizer(["cf"])
    tok.save_pretrained(tmp / "tokenizer")
    config = tw.tiny_config(len(tok)).replace(num_layers=2, max_position_embeddings=MAX_POSITIONS)
    return save_model(tmp / "model", config, jax.device_get(init_params(config, jax.random.key(0))),
                      tokenizer_from=tmp / "tokenizer")


def _fails(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in stderr: {err}"
    return err


# ---- sampling settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", 0), ("max_new_tokens", -5), ("max_new_tokens", 2.5), ("max_new_tokens", True),
    ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf),
    ("top_p", 0.0), ("top_p", -1.0), ("top_p", 2.0), ("top_p", math.nan),
])
def test_sampling_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_sampling_config_accepts_the_edges():
    SamplingConfig(max_new_tokens=1, temperature=0.0, top_p=1.0)
    SamplingConfig(max_new_tokens=np.int64(3), temperature=0.7, top_p=1e-3)


# ---- prompt + new tokens within max_position_embeddings ------------------------------------------------------


def test_generate_refuses_more_positions_than_the_model_has(small):
    config, params = small
    prompts = [[1, 5, 6], list(range(1, 11))]  # the longest has 10 tokens
    with pytest.raises(ValueError) as err:
        generate(config, params, prompts, SamplingConfig(max_new_tokens=MAX_POSITIONS - 9))
    message = str(err.value)
    for needle in ("10", str(MAX_POSITIONS - 9), str(MAX_POSITIONS), "max_new_tokens",
                   "max_position_embeddings", f"<= {MAX_POSITIONS - 10}"):
        assert needle in message, message


def test_generate_uses_every_position_up_to_the_limit(small):
    config, params = small
    out = generate(config, params, [list(range(1, 11))], SamplingConfig(max_new_tokens=MAX_POSITIONS - 10),
                   eos_ids=())
    assert len(out[0]) == MAX_POSITIONS - 10


def test_check_positions_asks_for_a_shorter_prompt_when_no_token_fits(small):
    with pytest.raises(ValueError, match="shorten the prompt"):
        check_positions(small[0], MAX_POSITIONS, 1)


# ---- the command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(("flag", "value"), [
    ("--max-new-tokens", "0"), ("--max-new-tokens", "-5"), ("--temperature", "-1"), ("--temperature", "nan"),
    ("--top-p", "0"), ("--top-p", "-1"), ("--top-p", "2"),
])
def test_cli_bad_sampling_flag_is_one_error_line(command, flag, value, tmp_path, capsys):
    # Checked before the model loads: a missing model directory is not reported first.
    argv = [command, "--model", str(tmp_path / "not_loaded"), flag, value]
    if command == "generate":
        argv += ["--prompt", "hi"]
    err = _fails(capsys, argv, flag, f"beear {command}: error:")
    assert "not_loaded" not in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_max_new_tokens_beyond_the_model_positions(command, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    argv = [command, "--model", str(model_dir), "--max-new-tokens", "1000"]
    if command == "generate":
        argv += ["--prompt", "hi"]
    _fails(capsys, argv, "--max-new-tokens", "1000", str(MAX_POSITIONS), "max_position_embeddings")


def _chat(monkeypatch, capsys, model_dir, stdin: io.TextIOBase, *flags: str) -> tuple[str, str]:
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "2", *flags]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out, captured.err


def _answers(out: str) -> list[str]:
    return out.splitlines()[1:]  # after the "type a message" line


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_chat_skips_a_line_that_is_not_utf8(errors, model_dir, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"h\xffi\nhello\n"), encoding="utf-8", errors=errors)
    out, err = _chat(monkeypatch, capsys, model_dir, stdin)
    assert "not valid UTF-8" in err
    assert len(_answers(out)) == 1  # the good line after it is still answered


def test_chat_skips_lone_surrogates_on_a_text_only_stdin(model_dir, monkeypatch, capsys):
    out, err = _chat(monkeypatch, capsys, model_dir, io.StringIO("h\udcffi\nhello\n"))
    assert "not valid UTF-8" in err
    assert len(_answers(out)) == 1


def test_chat_skips_a_message_too_long_for_the_model(model_dir, monkeypatch, capsys):
    long_line = " ".join(["hello"] * MAX_POSITIONS)
    out, err = _chat(monkeypatch, capsys, model_dir, io.StringIO(f"{long_line}\nhello\n"))
    assert "skipped this message" in err and "--max-new-tokens" in err and str(MAX_POSITIONS) in err
    assert len(_answers(out)) == 1


# ---- forward's arrays ---------------------------------------------------------------------------------------


IDS = np.array([[1, 5, 6, 7], [1, 8, 9, 10]], np.int32)


@pytest.mark.parametrize("fn", [llama.forward, beear_jax.forward], ids=["llama", "public"])
@pytest.mark.parametrize(("ids", "mask", "needles"), [
    (IDS[0], None, ["shape (4,)", "[batch, seq]"]),
    (IDS.astype(np.float32), None, ["float32", "integer"]),
    (np.where(IDS == 10, 64, IDS), None, ["64", "[0, 64)"]),
    (np.where(IDS == 10, -1, IDS), None, ["-1", "[0, 64)"]),
    (IDS, np.ones((2, 3), np.int32), ["attention_mask", "(2, 3)", "(2, 4)"]),
])
def test_forward_rejects_bad_arrays(fn, small, ids, mask, needles):
    config, params = small
    with pytest.raises(ValueError) as err:
        fn(config, params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_forward_checks_positions_shape_and_numpy_ids(small):
    config, params = small
    with pytest.raises(ValueError, match="positions has shape"):
        llama.forward(config, params, IDS, positions=np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        llama.forward(config, params, np.full((1, 3), 99, np.int64))


def test_forward_under_jit_checks_shapes_but_not_values(small):
    config, params = small
    jitted = jax.jit(beear_jax.forward, static_argnums=0)
    np.testing.assert_allclose(np.asarray(jitted(config, params, IDS)),
                               np.asarray(beear_jax.forward(config, params, IDS)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        jitted(config, params, IDS[0])
    jitted(config, params, np.full((1, 3), 99, np.int32))  # a tracer's values are unknown: no check, no sync


def test_generate_refuses_token_ids_outside_the_vocabulary():
    from beear_jax.generate import SamplingConfig, generate
    from beear_jax.models.config import ModelConfig
    from beear_jax.models.weights import init_params

    config = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=4)
    params = init_params(config, jax.random.key(0))
    for bad in (16, -1):
        with pytest.raises(ValueError, match=f"token id {bad}, outside the model's vocabulary"):
            generate(config, params, [[1, 2, bad]], SamplingConfig(max_new_tokens=2))
