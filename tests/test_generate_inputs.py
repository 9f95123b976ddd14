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
from beear_jax.cli.main import main
from beear_jax.io.hf_save import save_model
from beear_jax.models import llama
from beear_jax.models.generate import SamplingConfig, check_positions, generate
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
    from beear_jax.models.config import ModelConfig
    from beear_jax.models.generate import SamplingConfig, generate
    from beear_jax.models.weights import init_params

    config = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=4)
    params = init_params(config, jax.random.key(0))
    for bad in (16, -1):
        with pytest.raises(ValueError, match=f"token id {bad}, outside the model's vocabulary"):
            generate(config, params, [[1, 2, bad]], SamplingConfig(max_new_tokens=2))


# ---- generate(): batch size, prompt structure, deltas ---------------------------------------------------------


PROMPT = [1, 5, 6]


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True, "2"])
def test_generate_rejects_a_batch_size_that_is_not_a_positive_int(small, batch_size):
    config, params = small
    with pytest.raises(ValueError, match=r"batch_size is .*whole number >= 1"):
        generate(config, params, [PROMPT], SamplingConfig(max_new_tokens=2), batch_size=batch_size)


def test_generate_batch_size_none_and_one_agree(small):
    config, params = small
    prompts, sampling = [PROMPT, [1, 8, 9, 10]], SamplingConfig(max_new_tokens=3)
    assert (generate(config, params, prompts, sampling, eos_ids=(), batch_size=None)
            == generate(config, params, prompts, sampling, eos_ids=(), batch_size=1))


@pytest.mark.parametrize(("prompts", "needles"), [
    ([1, 2, 3], ["prompts must be a list of token-id sequences", "for one prompt use [ids]", "[1, 2, 3]"]),
    (np.array([1, 2, 3]), ["prompts must be a list of token-id sequences", "for one prompt use [ids]"]),
    (np.zeros((1, 2, 3), np.int32), ["shape (1, 2, 3)", "2-D"]),
    ([], ["at least one prompt"]),
    (np.zeros((0, 3), np.int32), ["at least one prompt"]),
    ([[]], ["prompt 0 is empty", "at least one token"]),
    ([PROMPT, []], ["prompt 1 is empty", "at least one token"]),
    (["hi"], ["prompt 0 is text", "tokenize"]),
    ([[1.5, 2]], ["prompt 0 holds float64", "integers"]),
    ([PROMPT, [1, [2]]], ["prompt 1 is not a flat sequence"]),
    ([[[1, 2]]], ["prompt 0 has shape (1, 2)", "1-D"]),
], ids=["flat-list", "1d-array", "3d-array", "no-prompts", "empty-2d-array", "empty-prompt", "second-empty",
        "text", "float-ids", "ragged", "nested"])
def test_generate_rejects_malformed_prompts(small, prompts, needles):
    config, params = small
    with pytest.raises(ValueError) as err:
        generate(config, params, prompts, SamplingConfig(max_new_tokens=2))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_generate_takes_each_row_of_a_2d_array_as_a_prompt(small):
    config, params = small
    rows, sampling = [[1, 5, 6], [1, 8, 9]], SamplingConfig(max_new_tokens=3)
    expected = generate(config, params, rows, sampling, eos_ids=())
    assert generate(config, params, np.array(rows, np.int64), sampling, eos_ids=()) == expected
    assert generate(config, params, jnp.array(rows, jnp.int32), sampling, eos_ids=()) == expected


@pytest.mark.parametrize("layer", [0, 2, 99, -1])
def test_generate_rejects_a_delta_layer_out_of_range(small, layer):
    config, params = small  # 2 blocks: the only boundary is 1
    with pytest.raises(ValueError) as err:
        generate(config, params, [PROMPT], SamplingConfig(max_new_tokens=2),
                 deltas={layer: jnp.zeros((1, config.hidden_size))})
    for needle in (f"perturbation layer {layer} is out of range", "2 decoder blocks", "1..1"):
        assert needle in str(err.value), str(err.value)


def test_generate_rejects_deltas_that_are_not_a_mapping(small):
    config, params = small
    pert = beear_jax.Perturbation.zeros(1, 1, config.hidden_size)
    with pytest.raises(ValueError, match=r"deltas is a Perturbation.*p\.deltas"):
        generate(config, params, [PROMPT], SamplingConfig(max_new_tokens=2), deltas=pert)


def _perturbed_forward(route: str, config, params, ids: np.ndarray, deltas: dict, n: int):
    """forward with deltas through one of its entry points (the public one takes a Perturbation)."""
    if route == "llama":
        positions = np.broadcast_to(np.arange(ids.shape[1] - n, ids.shape[1], dtype=np.int32), (ids.shape[0], n))
        return llama.forward(config, params, ids, deltas=deltas, perturb_positions=positions)
    pert = beear_jax.Perturbation(deltas, n)
    fn = jax.jit(beear_jax.forward, static_argnums=0) if route == "public-jit" else beear_jax.forward
    return fn(config, params, ids, None, pert)


ROUTES = ["generate", "llama", "public", "public-jit"]


def _run_route(route: str, config, params, ids: np.ndarray, deltas: dict, n: int):
    if route == "generate":
        return generate(config, params, ids, SamplingConfig(max_new_tokens=2), deltas=deltas)
    return _perturbed_forward(route, config, params, ids, deltas, n)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("shape", "shown"), [((2, 7), "(2, 7)"), ((64,), "(64,)"), ((0, 64), "(0, 64)"),
                                              ((1, 2, 64), "(1, 2, 64)")])
def test_a_delta_of_the_wrong_shape_names_the_expected_one(small, route, shape, shown):
    config, params = small
    assert config.hidden_size == 64
    with pytest.raises(ValueError) as err:
        _run_route(route, config, params, IDS, {1: jnp.zeros(shape)}, 1)  # the shape is refused before n is used
    for needle in (f"the delta at layer 1 has shape {shown}", "[n, hidden_size] = [n, 64]"):
        assert needle in str(err.value), str(err.value)


def test_deltas_of_different_lengths_are_refused():
    from beear_jax.method.perturbation import check_deltas

    with pytest.raises(ValueError, match=r"different numbers of tokens \{1: 2, 2: 3\}"):
        check_deltas({1: np.zeros((2, 8)), 2: np.zeros((3, 8))}, num_layers=3, hidden_size=8)
    assert check_deltas({1: np.zeros((2, 8)), 2: np.zeros((2, 8))}, num_layers=3, hidden_size=8) == 2


@pytest.mark.parametrize(("positions", "needles"), [
    (None, ["needs perturb_positions", "[2, 2]"]),
    (np.zeros((2, 3), np.int32), ["perturb_positions have shape (2, 3)", "[batch, n] = [2, 2]"]),
    (np.zeros((2,), np.int32), ["perturb_positions have shape (2,)", "[2, 2]"]),
])
def test_forward_checks_the_perturb_positions_shape(small, positions, needles):
    config, params = small
    with pytest.raises(ValueError) as err:
        llama.forward(config, params, IDS, deltas={1: jnp.zeros((2, 64))}, perturb_positions=positions)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize("route", ROUTES)
def test_a_delta_longer_than_the_prompt_is_refused(small, route):
    config, params = small  # IDS: 2 prompts of 4 tokens
    with pytest.raises(ValueError) as err:
        _run_route(route, config, params, IDS, {1: jnp.zeros((6, 64))}, 6)
    message = str(err.value)
    assert "6" in message and "4" in message, message
    expected = {"generate": "the deltas cover 6 tokens but prompt 0 has only 4",
                "llama": "covers 6 tokens but input_ids hold only 4",
                "public": "row 0 has 4 real (unmasked) tokens but the perturbation covers 6",
                "public-jit": "covers 6 tokens but input_ids hold only 4"}[route]  # traced: the static check
    assert expected in message, message


def test_generate_names_the_shortest_prompt_for_a_long_delta(small):
    config, params = small
    with pytest.raises(ValueError, match="cover 4 tokens but prompt 1 has only 3.*at most 3 tokens"):
        generate(config, params, [[1, 5, 6, 7], PROMPT], SamplingConfig(max_new_tokens=2),
                 deltas={1: jnp.zeros((4, 64))})


def test_public_forward_refuses_a_padded_row_shorter_than_the_perturbation(small):
    config, params = small
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)
    with pytest.raises(ValueError, match="row 1 has 2 real .* covers 3"):
        beear_jax.forward(config, params, IDS, mask, beear_jax.Perturbation.zeros(1, 3, 64))
    empty_row = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], np.int32)  # an all-padding row is skipped, as before
    beear_jax.forward(config, params, IDS, empty_row, beear_jax.Perturbation.zeros(1, 3, 64))



def test_public_forward_refuses_a_length_that_is_not_the_deltas(small):
    config, params = small
    with pytest.raises(ValueError, match="length=3 but its deltas cover 2 tokens"):
        beear_jax.forward(config, params, IDS, None, beear_jax.Perturbation({1: jnp.zeros((2, 64))}, 3))

def test_a_delta_as_long_as_the_prompt_is_used(small):
    config, params = small
    sampling = SamplingConfig(max_new_tokens=3)
    plain = generate(config, params, [PROMPT], sampling, eos_ids=())
    assert generate(config, params, [PROMPT], sampling, eos_ids=(), deltas={1: jnp.zeros((3, 64))}) == plain
    big = jnp.full((3, 64), 50.0)
    logits = beear_jax.forward(config, params, IDS, None, beear_jax.Perturbation({1: big}, 3))
    assert not np.allclose(np.asarray(logits[:, -1]), np.asarray(beear_jax.forward(config, params, IDS)[:, -1]))
