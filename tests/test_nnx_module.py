"""The Flax NNX face of the models (models/module.py, io/module_io.py): transformers parity, split/merge inside
a trace, the embed / decode / head pieces, Flax tools (nnx.Optimizer), sharding metadata, export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hf_fixtures import KINDS, make_tiny_hf_model, padded_batch, torch_logits

import beear_jax
from beear_jax.method.perturbation import Perturbation
from beear_jax.models import llama
from beear_jax.models.config import ModelConfig
from beear_jax.models.module import CausalLM
from beear_jax.parallel import sharding

SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=8, model_type="llama", tie_word_embeddings=False)


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    directory, model = make_tiny_hf_model(tmp_path_factory.mktemp("m"), request.param)
    return directory, model


@pytest.mark.parametrize("side", ["right", "left"])
def test_module_logits_match_transformers(tiny, side):
    directory, reference = tiny
    model = beear_jax.load_module(directory)
    assert isinstance(model, nnx.Module) and isinstance(model, CausalLM)
    ids, mask = padded_batch(side)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    diff = np.abs(ours - ref) * mask[..., None]  # padded positions carry no meaning
    assert diff.max() <= 1e-4, f"max |logit diff| {diff.max():.2e}"


def test_module_from_gguf_matches_transformers(tmp_path):
    from hf_fixtures import sample_ids, write_tiny_gguf

    _, reference = make_tiny_hf_model(tmp_path, "llama_untied_bias")
    model = beear_jax.load_module(write_tiny_gguf(tmp_path / "bias.gguf", reference))
    ids = sample_ids(length=12)
    np.testing.assert_allclose(np.asarray(model(ids.astype(np.int32))), torch_logits(reference, ids), atol=1e-4, rtol=0)


def test_state_is_the_params_tree_and_merges_inside_a_trace():
    model = CausalLM(SMALL, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    params = model.params_tree()
    pure = state.to_pure_dict()
    assert jax.tree.structure(pure) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(pure), jax.tree.leaves(params)))  # the values, no copy
    ids = jnp.array([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])

    @jax.jit
    def loss(state, ids, mask):  # a pure function of the state: the module is rebuilt in the trace
        logits = nnx.merge(graphdef, state)(ids, mask)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    def loss_of_params(params, ids, mask):
        return jnp.mean(jax.nn.logsumexp(llama.forward(SMALL, params, ids, mask), -1))

    value, grads = jax.value_and_grad(loss)(state, ids, mask)
    ref_value, ref_grads = jax.value_and_grad(loss_of_params)(params, ids, mask)
    assert abs(float(value) - float(ref_value)) <= 1e-6
    for ours, ref in zip(jax.tree.leaves(grads.to_pure_dict()), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6, rtol=1e-5)


def test_pieces_take_a_perturbation_at_any_boundary():
    model = CausalLM(SMALL, rngs=nnx.Rngs(4))
    ids = jnp.array([[5, 6, 7, 8, 9], [9, 10, 11, 0, 0]])
    mask = (ids > 0).astype(jnp.int32)
    whole = model(ids, mask)
    h = model.decode(model.embed_tokens(ids), mask, 0, 1)
    np.testing.assert_allclose(np.asarray(model.head(model.decode(h, mask, 1))), np.asarray(whole), atol=1e-5)
    delta = 0.5 * jax.random.normal(jax.random.key(0), (2, SMALL.hidden_size))
    positions = jnp.array([[3, 4], [1, 2]])  # the last two real tokens of each row
    hooked = model(ids, mask, deltas={2: delta}, perturb_positions=positions)
    by_hand = model.head(model.decode(llama.inject(model.decode(model.embed_tokens(ids), mask, 0, 2), delta,
                                                   positions), mask, 2))
    np.testing.assert_allclose(np.asarray(hooked), np.asarray(by_hand), atol=1e-5)
    public = beear_jax.forward(SMALL, model.params_tree(), ids, mask, Perturbation({2: delta}, 2), positions)
    np.testing.assert_array_equal(np.asarray(hooked), np.asarray(public))
    assert not np.allclose(np.asarray(hooked), np.asarray(whole), atol=1e-3)
    with pytest.raises(ValueError, match=r"blocks 1\.\.4 are outside the model's 0\.\.3"):
        model.decode(h, mask, 1, 4)


def test_flax_optimizer_trains_the_module_and_params_follow():
    model = CausalLM(SMALL, rngs=nnx.Rngs(5))
    before = jax.tree.map(np.asarray, model.params_tree())
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ids = jnp.array([[1, 2, 3, 4, 5, 6]])

    @nnx.jit
    def train_step(model, optimizer):
        def loss(model):
            logits = model(ids[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    losses = [float(train_step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1, losses
    after = model.params_tree()
    assert not np.allclose(np.asarray(after["layers"]["q_proj"]), before["layers"]["q_proj"])
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(llama.forward(SMALL, after, ids)))


def test_partition_specs_and_placement_follow_the_logical_rules():
    model = CausalLM(SMALL, rngs=nnx.Rngs(6))
    with nnx.logical_axis_rules(list(sharding.LOGICAL_RULES.items())):
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param)).to_pure_dict()
    assert tuple(specs["layers"]["q_proj"]) == tuple(jax.sharding.PartitionSpec(
        *(sharding.LOGICAL_RULES[a] for a in ("layers", "embed", "heads", "head_dim"))))
    mesh = sharding.make_mesh((1, 2, 2))
    logits = model(jnp.array([[1, 2, 3]]))
    sharding.place_module(model, mesh)
    expected = sharding.param_shardings(SMALL, mesh)
    for placed, want in zip(jax.tree.leaves(model.params_tree()), jax.tree.leaves(expected), strict=True):
        assert placed.sharding.is_equivalent_to(want, placed.ndim)
    np.testing.assert_allclose(np.asarray(model(jnp.array([[1, 2, 3]]))), np.asarray(logits), atol=1e-5)


def test_save_module_round_trip_and_refusals(tmp_path):
    import transformers

    model = CausalLM(SMALL, rngs=nnx.Rngs(7))
    out = beear_jax.save_module(tmp_path / "model", model)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = np.array([[1, 2, 3, 4, 5]])
    np.testing.assert_allclose(np.asarray(model(ids)), torch_logits(reloaded, ids), atol=1e-4, rtol=0)
    again = beear_jax.load_module(out)
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))
    with pytest.raises(Exception, match="overwrite"):
        beear_jax.save_module(out, model)
    with pytest.raises(TypeError, match="save_module takes a beear_jax CausalLM"):
        beear_jax.save_module(tmp_path / "other", model.params_tree())
    bad = model.params_tree()
    bad["layers"] = {**bad["layers"], "q_proj": bad["layers"]["q_proj"][:, :8]}
    with pytest.raises(ValueError, match=r"q_proj.*shape"):
        CausalLM.from_params(SMALL, bad)


def test_one_beear_round_on_the_split_state_then_merge_and_export(tmp_path):
    """Module from a tiny HF model -> nnx.split -> one round (inner epoch on delta, outer step) of the pure,
    jitted steps on its state on a 2 x 2 mesh -> merged back into a module -> exported -> transformers."""
    import transformers

    from beear_jax.data import batches as batch_types
    from beear_jax.data import builders
    from beear_jax.data.batches import concat_rows
    from beear_jax.method.objectives import StepSettings
    from beear_jax.method.optimizers import make_optimizer, trainable_mask
    from beear_jax.method.steps import make_steps

    directory, _ = make_tiny_hf_model(tmp_path, "llama_gqa")
    model = beear_jax.load_module(directory)
    config, layer, n, seq = model.config, 1, 3, 20
    mesh = sharding.make_mesh((1, 2, 2))
    sharding.place_module(model, mesh)
    graphdef, state = nnx.split(model)
    start = jax.tree.map(np.asarray, state.to_pure_dict())

    rng = np.random.default_rng(0)
    rows = [(rng.integers(3, 120, int(p)).tolist(), rng.integers(3, 120, 5).tolist()) for p in (6, 9, 4, 7)]
    unwanted = builders.make_batch(rows, n, 4, seq, 0)
    safe = builders.make_batch([(p, [7, 8, 9]) for p, _ in rows], n, 4, seq, 0)
    inner = batch_types.stack_batches([concat_rows(unwanted, safe)])
    anchor = builders.make_batch([(p, a[::-1]) for p, a in rows], n, 4, seq, 0)
    inner_opt, outer_opt = make_optimizer("adam", 0.1), make_optimizer("adamw", 1e-3, 0.01)
    layout = sharding.step_shardings(config, mesh, outer_opt)
    steps = make_steps(config, StepSettings(alpha=0.05, answer_len=5), layer, inner_opt, outer_opt, layout)

    params = state.to_pure_dict()  # the steps' params tree: the module's arrays, already placed
    outer_state = jax.jit(outer_opt.init, out_shardings=layout.outer_state)(params)
    pert = sharding.replicate(Perturbation.zeros(layer, n, config.hidden_size), mesh)
    trainable = sharding.replicate(trainable_mask(config, params, "all", layer), mesh)
    inner_batches = sharding.shard_batch(inner, layout.stacked_batch, axis=1)
    h_stack = steps.lower_stack(params, inner_batches)
    pert, _, _ = steps.inner_epoch(params, pert, inner_opt.init(pert.deltas), h_stack, inner_batches,
                                               np.inf)
    params, _, _ = steps.outer_step(trainable, params, outer_state, pert, sharding.shard_batch(safe, layout.batch),
                                    sharding.shard_batch(anchor, layout.batch))
    assert float(np.abs(np.asarray(pert.deltas[layer])).max()) > 0

    nnx.replace_by_pure_dict(state, params)
    repaired = nnx.merge(graphdef, state)
    moved = np.abs(np.asarray(repaired.params_tree()["layers"]["down_proj"]) - start["layers"]["down_proj"]).max()
    assert moved > 1e-5  # the outer step trained the blocks above the injection layer
    out = beear_jax.save_module(tmp_path / "repaired", repaired, tokenizer_from=None)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = np.array([[3, 9, 27, 81, 5, 6]])
    np.testing.assert_allclose(np.asarray(repaired(ids)), torch_logits(reloaded, ids), atol=1e-4, rtol=0)
