"""HF import/export: layout, round trips, transformers reloads, sharding, GGUF, and the refusals."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from hf_fixtures import KINDS, make_tiny_hf_model, make_tiny_tokenizer, sample_ids, torch_logits

from beear_jax.cli import main as cli
from beear_jax.io.hf import CheckpointError, from_hf_state_dict, load_model, load_tokenizer, to_hf_state_dict
from beear_jax.io.hf_save import save_model
from beear_jax.models.llama import forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    """(kind, hf dir, torch model, config, params) for each tiny kind, loaded once per module."""
    hf_dir, model = make_tiny_hf_model(tmp_path_factory.mktemp("hf"), request.param)
    config, params = load_model(hf_dir)
    return request.param, hf_dir, model, config, params


def _assert_trees_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _reload_logits(path: pathlib.Path, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return torch_logits(model.eval(), ids)


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _leftovers(parent: pathlib.Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ---- layout and round trips --------------------------------------------------------------------------------


def test_params_follow_documented_layout(tiny):
    """Each of our weights is the HF tensor transposed/reshaped exactly as weights.py documents."""
    _, _, model, config, params = tiny
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    layers = params["layers"]
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        np.testing.assert_array_equal(layers["q_proj"][i], sd[pre + "self_attn.q_proj.weight"].T.reshape(d, h, hd))
        np.testing.assert_array_equal(layers["k_proj"][i], sd[pre + "self_attn.k_proj.weight"].T.reshape(d, k, hd))
        np.testing.assert_array_equal(layers["v_proj"][i], sd[pre + "self_attn.v_proj.weight"].T.reshape(d, k, hd))
        np.testing.assert_array_equal(layers["o_proj"][i], sd[pre + "self_attn.o_proj.weight"].T.reshape(h, hd, d))
        np.testing.assert_array_equal(layers["gate_proj"][i], sd[pre + "mlp.gate_proj.weight"].T)
        np.testing.assert_array_equal(layers["down_proj"][i], sd[pre + "mlp.down_proj.weight"].T)
        np.testing.assert_array_equal(layers["attn_norm"][i], sd[pre + "input_layernorm.weight"])
        np.testing.assert_array_equal(layers["mlp_norm"][i], sd[pre + "post_attention_layernorm.weight"])
        if config.attention_bias:
            np.testing.assert_array_equal(layers["q_bias"][i], sd[pre + "self_attn.q_proj.bias"].reshape(h, hd))
            np.testing.assert_array_equal(layers["o_bias"][i], sd[pre + "self_attn.o_proj.bias"])
        if config.mlp_bias:
            np.testing.assert_array_equal(layers["down_bias"][i], sd[pre + "mlp.down_proj.bias"])
    np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["final_norm"], sd["model.norm.weight"])
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    if not config.tie_word_embeddings:
        np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].T)


def test_state_dict_helpers_invert_each_other(tiny):
    _, _, model, config, params = tiny
    _assert_trees_equal(from_hf_state_dict(config, model.state_dict()), params)
    _assert_trees_equal(from_hf_state_dict(config, to_hf_state_dict(config, params)), params)


def test_round_trip_is_bitwise(tiny, tmp_path):
    _, _, _, config, params = tiny
    out = save_model(tmp_path / "export", config, params)
    config2, params2 = load_model(out)
    assert config2 == config
    _assert_trees_equal(params2, params)
    assert _leftovers(tmp_path) == []


def test_transformers_reloads_export_with_same_logits(tiny, tmp_path):
    _, _, model, config, params = tiny
    out = save_model(tmp_path / "export", config, params)
    ids = sample_ids(length=12)  # longer than mistral_sliding's window of 4
    np.testing.assert_allclose(_reload_logits(out, ids), torch_logits(model, ids), atol=1e-4, rtol=0)
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in _safetensors_names(out / "model.safetensors")


def test_our_forward_matches_torch(tiny):
    from beear_jax.models.llama import forward

    _, _, model, config, params = tiny
    ids = sample_ids(length=12)
    ours = forward(config, jax.tree.map(np.asarray, params), ids.astype(np.int32))
    np.testing.assert_allclose(np.asarray(ours), torch_logits(model, ids), atol=1e-4, rtol=0)


def _safetensors_names(path: pathlib.Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return list(f.keys())


def test_save_accepts_device_arrays(tmp_path):
    """Params placed on the (8 simulated) devices, one of them sharded, export like host arrays."""
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    config, params = load_model(hf_dir)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    on_device = {**jax.device_put(params), "embed": jax.device_put(
        params["embed"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))}
    _assert_trees_equal(load_model(save_model(tmp_path / "export", config, on_device))[1], params)


def test_sharded_export_loads_back(tmp_path):
    hf_dir, model = make_tiny_hf_model(tmp_path, "llama_untied_bias")
    config, params = load_model(hf_dir)
    out = save_model(tmp_path / "sharded", config, params, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    _assert_trees_equal(load_model(out)[1], params)
    ids = sample_ids()
    np.testing.assert_allclose(_reload_logits(out, ids), torch_logits(model, ids), atol=1e-4, rtol=0)


def test_bfloat16_export(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    config, params = load_model(hf_dir)
    out = save_model(tmp_path / "bf16", config, params, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32), params)
    _assert_trees_equal(load_model(out)[1], rounded)
    assert transformers.AutoModelForCausalLM.from_pretrained(str(out)).dtype == torch.bfloat16


def test_tokenizer_files_and_generation_config_are_copied(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    make_tiny_tokenizer(hf_dir)
    config, params = load_model(hf_dir)
    out = save_model(tmp_path / "export", config, params, tokenizer_from=hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    assert load_tokenizer(out)("w1 w2").input_ids == load_tokenizer(hf_dir)("w1 w2").input_ids



def test_export_keeps_the_source_training_keys_of_config_json(tmp_path):
    """attention_dropout / initializer_range / pretraining_tp are not ours to use, but transformers
    reads them (further training), so an export from an HF directory keeps the source's values."""
    import transformers

    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    make_tiny_tokenizer(hf_dir)
    source = json.loads((hf_dir / "config.json").read_text())
    source.update(attention_dropout=0.125, initializer_range=0.0625, pretraining_tp=1,
                  quantization_config={"quant_method": "bitsandbytes"})
    (hf_dir / "config.json").write_text(json.dumps(source))
    config, params = load_model(hf_dir)
    out = save_model(tmp_path / "export", config, params, tokenizer_from=hf_dir)
    written = json.loads((out / "config.json").read_text())
    assert (written["attention_dropout"], written["initializer_range"], written["pretraining_tp"]) == (0.125, 0.0625, 1)
    assert "quantization_config" not in written  # the export's weights are plain floats
    reread = transformers.AutoConfig.from_pretrained(out)
    assert (reread.attention_dropout, reread.initializer_range) == (0.125, 0.0625)


def test_a_killed_exports_temp_dir_is_removed_by_the_next(tmp_path):
    """A temp dir whose process is gone (SIGKILL mid-export) is deleted; a live process's is left."""
    import os
    import socket
    import subprocess

    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    config, params = load_model(hf_dir)
    child = subprocess.Popen(["true"])
    child.wait()
    host = socket.gethostname()
    stale = tmp_path / f".export.tmp-{host}-{child.pid}-0badc0de"
    live = tmp_path / f".export.tmp-{host}-{os.getpid()}-0badc0de"
    for path in (stale, live):
        (path).mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    save_model(tmp_path / "export", config, params)
    assert not stale.exists() and live.exists()


# ---- refusals ----------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_gpt2_config_is_unsupported(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="unsupported architecture.*gpt2"):
        load_model(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 10])
def test_truncated_safetensors(tmp_path, keep):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(hf_dir)


def test_pickle_checkpoint_needs_consent(tmp_path):
    hf_dir, model = make_tiny_hf_model(tmp_path, "llama_gqa")
    _, params = load_model(hf_dir)
    (hf_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="arbitrary code.*convert --allow-pickle.*allow_pickle=True"):
        load_model(hf_dir)
    _assert_trees_equal(load_model(hf_dir, allow_pickle=True)[1], params)
    # The command line's way: one safetensors copy, which then loads without consent.
    make_tiny_tokenizer(hf_dir)
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "copy")]) == 1
    assert cli.main(["convert", "--allow-pickle", str(hf_dir), str(tmp_path / "copy")]) == 0
    _assert_trees_equal(load_model(tmp_path / "copy")[1], params)
    # Consent does not make a damaged file or a pickled model object readable: both are named.
    data = (hf_dir / "pytorch_model.bin").read_bytes()
    (hf_dir / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin cannot be read as a state dict"):
        load_model(hf_dir, allow_pickle=True)
    torch.save(model, hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled model object"):
        load_model(hf_dir, allow_pickle=True)


def _rewrite_weights(hf_dir: pathlib.Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    save_file(edit(tensors), str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    _rewrite_weights(hf_dir, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(hf_dir)


def test_wrong_shape(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight \[96, 64\] \(expected \[80, 64\]\)"):
        load_model(hf_dir)



def test_integer_weights_are_refused(tmp_path):
    """An integer tensor (a quantized or damaged file) is named, not cast to float32 without a word."""
    from safetensors.numpy import load_file, save_file

    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.norm.weight is stored as int32, not as floating point"):
        load_model(hf_dir)


def test_a_tensor_in_two_unindexed_files_is_refused(tmp_path):
    """Without an index, every *.safetensors is read: a tensor in two of them (a stale copy) is named
    instead of the last file read silently winning."""
    from safetensors.numpy import load_file, save_file

    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    tensors = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[: len(names) // 2 + 1]}, hf_dir / "part-a.safetensors")
    save_file({n: tensors[n] for n in names[len(names) // 2:]}, hf_dir / "part-b.safetensors")
    with pytest.raises(CheckpointError, match=r"is stored in two files of .*remove the stale copy"):
        load_model(hf_dir)

def test_unexpected_tensor(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_untied_bias")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    with pytest.raises(CheckpointError, match="does not use.*q_proj.bias"):
        load_model(hf_dir)


def test_index_naming_absent_shard(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    config, params = load_model(hf_dir)
    out = save_model(tmp_path / "sharded", config, params, max_shard_bytes=40_000)
    next(out.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="not there: model-00002"):
        load_model(out)


@pytest.mark.parametrize("index", [[], {"weight_map": ["model.safetensors"]}, {"weight_map": {"a": 3}},
                                   {"weight_map": {"a": None}}, {"metadata": {}}])
def test_malformed_shard_index(tmp_path, index):
    """A shard index that is not {"weight_map": {tensor: file}} is named (a list or a number in it was a
    bare TypeError)."""
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index.json is not a valid shard index .*; download it again"):
        load_model(hf_dir)


def test_directory_named_like_a_weight_file_is_not_read(tmp_path):
    """A directory called *.safetensors is skipped (it was an OSError from safe_open), so the message says
    that no weights are there."""
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_model(hf_dir)


def test_existing_model_directory_is_never_overwritten(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    other_dir, _ = make_tiny_hf_model(tmp_path / "other", "mistral_sliding")
    config, params = load_model(other_dir)
    before = _snapshot(hf_dir)
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        save_model(hf_dir, config, params)
    assert _snapshot(hf_dir) == before
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_a_model_directory_only(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    other_dir, _ = make_tiny_hf_model(tmp_path / "other", "mistral_sliding")
    config, params = load_model(other_dir)
    save_model(hf_dir, config, params, overwrite=True)
    assert load_model(hf_dir)[0] == config and _leftovers(tmp_path) == []
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "diary.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a model directory"):
        save_model(notes, config, params, overwrite=True)
    assert (notes / "diary.txt").read_text() == "mine"


def test_overwrite_keeps_files_that_are_not_the_model(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    other_dir, _ = make_tiny_hf_model(tmp_path / "other", "mistral_sliding")
    config, params = load_model(other_dir)
    (hf_dir / "README.md").write_text("model card")
    (hf_dir / "extras").mkdir()
    (hf_dir / "extras" / "eval.txt").write_text("old numbers")
    make_tiny_tokenizer(hf_dir)  # the old model's tokenizer goes with it: the new model is saved without one
    save_model(hf_dir, config, params, overwrite=True)
    assert (hf_dir / "README.md").read_text() == "model card"
    assert (hf_dir / "extras" / "eval.txt").read_text() == "old numbers"
    assert not (hf_dir / "tokenizer.json").exists() and load_model(hf_dir)[0] == config
    assert _leftovers(tmp_path) == []


def test_save_refuses_to_replace_its_own_tokenizer_source(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path / "base", "llama_gqa")
    make_tiny_tokenizer(hf_dir)
    config, params = load_model(hf_dir)
    before = _snapshot(hf_dir)
    for target in (hf_dir, hf_dir.parent):  # the source itself, or a directory holding it
        (target / "config.json").write_text((hf_dir / "config.json").read_text())
        with pytest.raises(CheckpointError, match=r"is, lies inside or contains tokenizer_from \(the source model\)"):
            save_model(target, config, params, tokenizer_from=hf_dir, overwrite=True)
    assert _snapshot(hf_dir) == before


def test_output_symlink_is_written_where_it_points(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    config, params = load_model(hf_dir)
    (tmp_path / "disk" / "models").mkdir(parents=True)
    link = tmp_path / "models"
    link.symlink_to(tmp_path / "disk" / "models")
    assert save_model(link, config, params) == tmp_path / "disk" / "models"
    save_model(link, config, params, overwrite=True)
    assert link.is_symlink() and (tmp_path / "disk" / "models" / "config.json").is_file()
    _assert_trees_equal(load_model(link)[1], params)
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "disk") == []


@pytest.mark.parametrize(("value", "dtype", "pattern"), [
    (1e5, "float16", "beyond float16's range.*bfloat16 or float32"),
    (np.nan, "float32", "NaN or inf"),
])
def test_non_finite_weights_are_not_saved(tmp_path, value, dtype, pattern):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    config, params = load_model(hf_dir)
    bad = {**params, "embed": np.asarray(params["embed"]).copy()}
    bad["embed"][3, 5] = value
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight.*" + pattern):
        save_model(tmp_path / "out", config, bad, dtype=dtype)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_failed_save_leaves_nothing_behind(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    config, params = load_model(hf_dir)
    bad = {**params, "embed": params["embed"][:, :8]}
    with pytest.raises(CheckpointError, match="embed"):
        save_model(tmp_path / "out", config, bad)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        save_model(tmp_path / "out", config, params, tokenizer_from=hf_dir)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_empty_existing_directory_is_fine(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    config, params = load_model(hf_dir)
    (tmp_path / "empty").mkdir()
    _assert_trees_equal(load_model(save_model(tmp_path / "empty", config, params))[1], params)


def test_missing_torch_names_the_extra(monkeypatch):
    from beear_jax.io import gguf as hf_gguf

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"beear_jax\[torch\]"):
        hf_gguf.require_torch("Reading a GGUF file")


def test_tokenizer_source_without_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


# ---- GGUF (tiny files from hf_fixtures; the real SmolLM2 file: test_cli's convert test, test_smollm2) ---------


def test_gguf_directory_with_two_files_is_ambiguous(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several .gguf files"):
        load_model(tmp_path)


def test_damaged_gguf_tokenizer_is_named(tmp_path):
    """A GGUF file whose tokenizer cannot be read is a CheckpointError naming it (a bare struct.error or
    ValueError from the GGUF reader before), also as save_model's tokenizer_from, which leaves nothing behind."""
    from hf_fixtures import write_tiny_gguf

    hf_dir, model = make_tiny_hf_model(tmp_path, "llama_gqa")
    config, params = load_model(hf_dir)
    good = write_tiny_gguf(tmp_path / "good.gguf", model)
    damaged = tmp_path / "damaged" / "model.gguf"
    damaged.parent.mkdir()
    damaged.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model.gguf: the tokenizer in this GGUF file cannot be read"):
        load_tokenizer(damaged)
    with pytest.raises(CheckpointError, match=r"model.gguf: the tokenizer in this GGUF file cannot be read"):
        save_model(tmp_path / "out", config, params, tokenizer_from=damaged)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_gguf_with_biases_loads_them(tmp_path):
    """llama.cpp writes a Llama's q/k/v/o and MLP biases as blk.N.*.bias, but GGUF metadata has no
    attention_bias / mlp_bias: they are read from the tensors (transformers' reader dropped them, and the
    model loaded without its biases)."""
    from hf_fixtures import write_tiny_gguf

    _, model = make_tiny_hf_model(tmp_path, "llama_untied_bias")
    config, params = load_model(write_tiny_gguf(tmp_path / "bias.gguf", model))
    assert config.attention_bias and config.mlp_bias
    ids = sample_ids(length=12)
    ours = np.asarray(jax.jit(forward, static_argnums=0)(config, params, ids.astype(np.int32)))
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("quantize", ["F16", "BF16", "Q8_0", "Q4_0"])
def test_quantized_gguf_loads_as_transformers_loads_it(tmp_path, quantize):
    """Our dequantization and q/k un-permutation against transformers' own GGUF import of the same file."""
    from hf_fixtures import write_tiny_gguf

    _, model = make_tiny_hf_model(tmp_path, "llama_gqa")
    path = write_tiny_gguf(tmp_path / f"{quantize}.gguf", model, quantize=quantize)
    config, params = load_model(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    ids = sample_ids(length=12)
    ours = np.asarray(jax.jit(forward, static_argnums=0)(config, params, ids.astype(np.int32)))
    np.testing.assert_allclose(ours, torch_logits(reference, ids), atol=1e-4, rtol=0)
    from beear_jax.io.gguf import open_gguf

    assert quantize in {t.tensor_type.name for t in open_gguf(path).tensors}  # the matrices really are quantized


def test_gguf_tensors_without_a_llama_place_are_refused(tmp_path):
    """Tensors a Llama has no place for (here a q-norm) are named, not dropped while the rest loads."""
    import gguf
    from hf_fixtures import write_tiny_gguf

    _, model = make_tiny_hf_model(tmp_path, "llama_gqa")
    real = gguf.GGUFWriter.write_header_to_file

    def with_extra(self, *args, **kwargs):
        self.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, np.float32))
        return real(self, *args, **kwargs)

    gguf.GGUFWriter.write_header_to_file = with_extra
    try:
        path = write_tiny_gguf(tmp_path / "extra.gguf", model)
    finally:
        gguf.GGUFWriter.write_header_to_file = real
    with pytest.raises(CheckpointError, match=r"extra.gguf: tensors that a Llama model has no place for: "
                                              r"blk\.0\.attn_q_norm\.weight"):
        load_model(path)


def test_unsupported_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="not a .gguf file"):
        load_model(tmp_path / "model.bin")


def test_dtype_is_validated(tmp_path):
    with pytest.raises(CheckpointError, match="dtype 'int8'"):
        load_model(tmp_path, dtype="int8")


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0}])
def test_keys_left_out_of_config_json_mean_what_they_mean_to_transformers(model_type, rope):
    import transformers

    from beear_jax.models.config import ModelConfig

    minimal = {"model_type": model_type, "vocab_size": 64, "hidden_size": 64, "intermediate_size": 48,
               "num_hidden_layers": 1, "num_attention_heads": 8}
    if rope:
        minimal["rope_scaling"] = rope
    ours = ModelConfig.from_hf_dict(dict(minimal))
    fields = {k: v for k, v in minimal.items() if k != "model_type"}
    theirs = transformers.AutoConfig.for_model(model_type, **fields)
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.sliding_window == getattr(theirs, "sliding_window", None)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert (ours.rms_norm_eps, ours.tie_word_embeddings) == (theirs.rms_norm_eps, theirs.tie_word_embeddings)
    assert ours.num_kv_heads == theirs.num_key_value_heads and ours.head_dim == theirs.head_dim
    if rope:
        assert dict(ours.rope_scaling)["original_max_position_embeddings"] == \
            theirs.rope_parameters["original_max_position_embeddings"]


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_null_kv_heads_means_one_per_attention_head(model_type):
    from beear_jax.models.config import ModelConfig

    hf = {"model_type": model_type, "vocab_size": 64, "hidden_size": 64, "intermediate_size": 48,
          "num_hidden_layers": 1, "num_attention_heads": 16, "num_key_value_heads": None}
    assert ModelConfig.from_hf_dict(hf).num_kv_heads == 16
    exported = ModelConfig.from_hf_dict(hf).to_hf_dict()
    assert exported["num_key_value_heads"] == 16  # written out, so transformers 5 (which refuses null) loads it
    del hf["num_key_value_heads"]
    assert ModelConfig.from_hf_dict(hf).num_kv_heads == (16 if model_type == "llama" else 8)


def test_damaged_tokenizer_files_are_named(tmp_path):
    out = tmp_path / "tok"
    make_tiny_tokenizer(out)
    (out / "tokenizer.json").write_text("{garbage")
    with pytest.raises(CheckpointError, match=r"tokenizer files cannot be loaded"):
        load_tokenizer(out)


@pytest.mark.parametrize(("change", "pattern"), [
    ({"num_kv_heads": 0}, "num_key_value_heads=0: sizes must be positive integers"),
    ({"hidden_size": 64.0}, "hidden_size=64.0"),
    ({"dtype": "bf16"}, "dtype 'bf16' is not a compute dtype; use one of float32, bfloat16, float16"),
])
def test_model_config_refuses_impossible_values(change, pattern):
    from beear_jax.models.config import ModelConfig, ModelConfigError

    shape = {"vocab_size": 16, "hidden_size": 64, "intermediate_size": 32, "num_layers": 2, "num_heads": 4,
             "num_kv_heads": 2, "head_dim": 16}
    ModelConfig(**shape, dtype="bfloat16")
    with pytest.raises(ModelConfigError, match=pattern):
        ModelConfig(**{**shape, **change})


_MINIMAL_HF = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 48,
               "num_hidden_layers": 1, "num_attention_heads": 8}


@pytest.mark.parametrize(("change", "pattern"), [
    # Wrong JSON types: each used to be a raw TypeError/ValueError from int()/float()/dict(), or read silently
    # as something else (bool("false") is True: an untied model loaded as tied).
    ({"hidden_size": None}, r"hidden_size is None \(NoneType\); it must be a whole number"),
    ({"vocab_size": "abc"}, r"vocab_size is 'abc' \(str\); it must be a whole number"),
    ({"hidden_size": 64.5}, r"hidden_size is 64.5 \(float\)"),
    ({"num_hidden_layers": [1]}, r"num_hidden_layers is \[1\]"),
    ({"num_key_value_heads": "2"}, r"num_key_value_heads is '2' \(str\)"),
    ({"tie_word_embeddings": "false"}, r"tie_word_embeddings is 'false' \(str\); it must be true or false"),
    ({"attention_bias": 1}, r"attention_bias is 1 \(int\); it must be true or false"),
    ({"rms_norm_eps": None}, r"rms_norm_eps is None \(NoneType\); it must be a number"),
    ({"rope_theta": "abc"}, r"rope_theta is 'abc' \(str\); it must be a number"),
    ({"rope_scaling": "linear"}, r"rope_scaling is 'linear' \(str\); it must be an object"),
    ({"rope_parameters": [1, 2]}, r"rope_parameters is \[1, 2\] \(list\); it must be an object"),
    ({"bos_token_id": [1]}, r"bos_token_id=\[1\]: token ids must be integers"),
    ({"eos_token_id": "2"}, r"eos_token_id='2': token ids must be integers"),
    # Values transformers refuses too, which used to load and fail (or give NaN) in the forward pass.
    ({"num_key_value_heads": 0}, r"num_key_value_heads=0: sizes must be positive integers"),
    ({"head_dim": 7}, r"head_dim \(7\) must be even"),
    ({"rms_norm_eps": -1e-5}, r"rms_norm_eps=-1e-05: it must be a finite number >= 0"),
    ({"rope_theta": 0}, r"rope_theta=0.0: it must be a finite number > 0"),
    ({"rope_scaling": {"type": "linear"}}, r"rope scaling 'linear' lacks factor"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "4"}}, r"rope scaling 'linear': factor='4' must be"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"'llama3' lacks high_freq_factor, low_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
     r"high_freq_factor \(4.0\) must be larger than low_freq_factor \(4.0\)"),
    ({"model_type": "mistral", "sliding_window": 0}, r"sliding_window=0: it must be a positive whole number"),
    ({"model_type": "mistral", "sliding_window": "4"}, r"sliding_window='4'"),
])
def test_config_json_values_of_the_wrong_type_or_range_are_named(change, pattern):
    from beear_jax.models.config import ModelConfig, ModelConfigError

    with pytest.raises(ModelConfigError, match=pattern):
        ModelConfig.from_hf_dict({**_MINIMAL_HF, **change})


def test_config_json_nulls_and_numpy_values_still_load():
    """JSON null means 'not set' where transformers reads it so (head_dim, num_key_value_heads, sliding_window,
    rope_scaling); numpy integers (GGUF metadata) are whole numbers too."""
    from beear_jax.models.config import ModelConfig

    config = ModelConfig.from_hf_dict({**_MINIMAL_HF, "model_type": "mistral", "head_dim": None,
                                       "num_key_value_heads": None, "sliding_window": None, "rope_scaling": None,
                                       "hidden_size": np.int64(64), "eos_token_id": [2, 3], "pad_token_id": -1})
    assert (config.head_dim, config.num_kv_heads, config.sliding_window, config.rope_scaling) == (8, 8, None, None)
    assert config.hidden_size == 64 and config.eos_token_id == (2, 3)
    hash(config)


def test_config_json_with_a_wrong_type_is_a_checkpoint_error(tmp_path):
    hf_dir, _ = make_tiny_hf_model(tmp_path, "llama_untied_bias")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": "false"}))
    with pytest.raises(CheckpointError, match=r"config.json: .*tie_word_embeddings is 'false'"):
        load_model(hf_dir)
