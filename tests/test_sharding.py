"""Sharded steps on 8 simulated CPU devices give the one-device results, with the expected shardings."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from beear_jax.data import batches as batch_types
from beear_jax.data import builders, packing
from beear_jax.data.batches import concat_rows
from beear_jax.method.objectives import StepSettings
from beear_jax.method.optimizers import make_optimizer, trainable_mask
from beear_jax.method.perturbation import Perturbation
from beear_jax.method.steps import make_steps
from beear_jax.models.config import ModelConfig
from beear_jax.models.weights import init_params
from beear_jax.parallel import sharding as sh

CONFIG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                     num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
LAYER, N, S, INNER_BS, OUTER_BS = 1, 3, 16, 4, 8
SETTINGS = StepSettings(alpha=0.05, answer_len=6)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


def _rows(rng: np.random.Generator, count: int) -> list[tuple[list[int], list[int]]]:
    return [(rng.integers(3, 128, int(rng.integers(4, 9))).tolist(), rng.integers(3, 128, int(rng.integers(2, 7))).tolist())
            for _ in range(count)]


def _world(seed: int = 0, shared_prompt: bool = False, prefix: bool = False) -> dict:
    """Host params, two inner batches and one outer (safe, anchor) pair. Inner batches: [unwanted; safe]
    rows of INNER_BS prompts, or (shared_prompt) one row per prompt for 2 x INNER_BS prompts (prefix:
    split into a cached prompt prefix and the rest, builders.with_prompt_prefix)."""
    rng = np.random.default_rng(seed)
    inner = []
    for _ in range(2):
        prompts = _rows(rng, 2 * INNER_BS if shared_prompt else INNER_BS)
        unwanted_answers = [rng.integers(3, 128, 5).tolist() for _ in prompts]
        if shared_prompt:
            batch = builders.make_shared_prompt_batch([p for p, _ in prompts], unwanted_answers,
                                                      [a for _, a in prompts], N, 2 * INNER_BS, 2 * S, 6, 0)
            inner.append(builders.with_prompt_prefix(batch, N, 8, 16) if prefix else batch)
            continue
        unwanted = builders.make_batch([(p, a) for (p, _), a in zip(prompts, unwanted_answers)], N, INNER_BS, S, 0)
        safe = builders.make_batch(prompts, N, INNER_BS, S, 0)
        inner.append(concat_rows(unwanted, safe))
    safe_rows, anchor_rows = _rows(rng, OUTER_BS - 1), _rows(rng, OUTER_BS)  # one padding row
    rows, row_len = packing.packing_shape([[len(p) + len(a) for p, a in [*safe_rows, *anchor_rows]]], S, 4)
    return {
        "params": jax.device_get(init_params(CONFIG, jax.random.key(seed), std=0.1)),
        "inner": batch_types.stack_batches(inner),
        "safe": builders.make_batch(safe_rows, N, OUTER_BS, S, 0),
        "anchor": builders.make_batch(anchor_rows, N, OUTER_BS, S, 0),
        "packed": packing.make_packed_batch([safe_rows, anchor_rows], [True, False], OUTER_BS, N, rows, row_len, 6, 0),
    }


def _run(world: dict, mesh=None, packed: bool = False) -> dict:
    """lower_stack -> inner_epoch -> outer_step, on a mesh or (mesh=None) on one device without shardings
    (packed: the outer step gets the packed batch of the same examples)."""
    # Outer lr as in the SmolLM2 setting: Adam's first update is lr * g / (|g| + eps), so where a gradient
    # entry is at rounding level its sign is noise and any two summation orders differ by up to 2 lr there.
    inner_opt, outer_opt = make_optimizer("adam", 0.1), make_optimizer("adamw", 2e-5, 0.01)
    if mesh is None:
        steps = make_steps(CONFIG, SETTINGS, LAYER, inner_opt, outer_opt)
        params = jax.tree.map(jax.numpy.asarray, world["params"])
        outer_state = outer_opt.init(params)
        batches = world["inner"], *((world["packed"], None) if packed else (world["safe"], world["anchor"]))
        pert = Perturbation.zeros(LAYER, N, CONFIG.hidden_size)
        trainable = trainable_mask(CONFIG, params, "all", LAYER)
    else:
        layout = sh.step_shardings(CONFIG, mesh, outer_opt)
        steps = make_steps(CONFIG, SETTINGS, LAYER, inner_opt, outer_opt, layout)
        params = sh.place_params(world["params"], layout.params)
        outer_state = jax.jit(outer_opt.init, out_shardings=layout.outer_state)(params)
        outer = (world["packed"], None) if packed else (world["safe"], world["anchor"])
        batches = (sh.shard_batch(world["inner"], layout.stacked_batch, axis=1),
                   *(None if b is None else sh.shard_batch(b, layout.batch) for b in outer))
        pert = sh.replicate(Perturbation.zeros(LAYER, N, CONFIG.hidden_size), mesh)
        trainable = sh.replicate(trainable_mask(CONFIG, params, "all", LAYER), mesh)
    inner_stack, safe, anchor = batches
    inner_state = inner_opt.init(pert.deltas)
    h_stack = steps.lower_stack(params, inner_stack)
    pert, inner_state, inner_metrics = steps.inner_epoch(params, pert, inner_state, h_stack, inner_stack, np.inf)
    params, outer_state, outer_metrics = steps.outer_step(trainable, params, outer_state, pert, safe, anchor)
    return {"h_stack": h_stack, "pert": pert, "params": params, "outer_state": outer_state,
            "inner_metrics": inner_metrics, "outer_metrics": outer_metrics}


@pytest.fixture(scope="module")
def reference():
    world = _world()
    return world, jax.device_get(_run(world))


def _close(actual, expected, what: str, rtol: float = 1e-5) -> None:
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.abs(b).max()), 1e-12)
        assert np.abs(a - b).max() <= rtol * scale, f"{what}{jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_steps_match_one_device(reference, shape):
    world, ref = reference
    mesh = sh.make_mesh(shape)
    out = _run(world, mesh)
    _close(out["inner_metrics"], ref["inner_metrics"], "inner metrics")
    _close(out["outer_metrics"], ref["outer_metrics"], "outer metrics")
    _close(out["pert"].deltas, ref["pert"].deltas, "delta")
    _close(out["params"], ref["params"], "params")
    _close(out["outer_state"], ref["outer_state"], "outer state")

    specs = sh.param_specs(CONFIG, sh.axis_sizes(mesh))
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(out["params"])[0], jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, P)), strict=True):
        assert leaf.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), leaf.ndim), \
            jax.tree_util.keystr(path)
    mu = out["outer_state"][0].mu
    assert mu["layers"]["q_proj"].sharding.spec == out["params"]["layers"]["q_proj"].sharding.spec
    assert out["pert"].deltas[LAYER].sharding.is_fully_replicated
    assert out["h_stack"].sharding.spec == P(None, ("data", "fsdp"))
    rows = 2 * INNER_BS // (shape[0] * shape[1])
    assert out["h_stack"].addressable_shards[0].data.shape == (2, rows, S, CONFIG.hidden_size)


@pytest.mark.parametrize("prefix", [False, True], ids=["rows", "prefix_cache"])
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_shared_prompt_steps_match_one_device(shape, prefix):
    """Shared-prompt inner rows (positions, branches, [B, 2, A] answer gathers) split over the batch axes;
    with a prefix cache, the cached suffix h_l and prefix keys/values too."""
    world = _world(1, shared_prompt=True, prefix=prefix)
    ref = jax.device_get(_run(world))
    out = _run(world, sh.make_mesh(shape))
    _close(out["inner_metrics"], ref["inner_metrics"], "inner metrics")
    # Two Adam steps divide by |g|: summation-order rounding of g shows at ~1e-5 of delta's scale.
    _close(out["pert"].deltas, ref["pert"].deltas, "delta", rtol=5e-5)
    _close(out["outer_metrics"], ref["outer_metrics"], "outer metrics")
    _close(out["params"], ref["params"], "params")
    for leaf in jax.tree.leaves(out["h_stack"]):
        assert leaf.sharding.spec == P(None, ("data", "fsdp"))
    if prefix:
        assert out["h_stack"].k.shape == (2, 2 * INNER_BS, CONFIG.num_layers - LAYER, 8, CONFIG.num_kv_heads,
                                             CONFIG.head_dim)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_packed_outer_step_matches_padded_rows(reference, shape):
    """The packed outer batch (several examples per row, rows split over the batch axes; its answer
    gather crosses rows) gives the padded rows' outer metrics and params on a mesh."""
    world, ref = reference
    out = _run(world, sh.make_mesh(shape), packed=True)
    assert world["packed"].branches.max() > 1  # rows really hold several examples
    _close(out["outer_metrics"], ref["outer_metrics"], "outer metrics")
    _close(out["params"], ref["params"], "params")


def test_logical_rules_per_mesh():
    sizes = sh.axis_sizes((1, 2, 4))
    specs = sh.param_specs(CONFIG, sizes)
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert specs["layers"]["q_proj"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["k_proj"] == P(None, "fsdp")  # 2 kv heads do not split 4 ways: replicated
    assert specs["layers"]["o_proj"] == P(None, "tensor", None, "fsdp")
    assert specs["layers"]["down_proj"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["attn_norm"] == P(None, "fsdp")
    assert sh.param_specs(CONFIG, sh.axis_sizes((8, 1, 1)))["layers"]["q_proj"] == P()  # pure data parallel
    assert sh.shard_shape((3, 64, 4, 16), specs["layers"]["q_proj"], sizes) == (3, 32, 1, 16)


def test_mesh_shapes_and_batch_errors():
    assert sh.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert sh.resolve_mesh_shape((1, 1, 1), 8) == (1, 1, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        sh.resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sh.resolve_mesh_shape((4, 4, 1), 8)
    with pytest.raises(ValueError, match=r"outer.batch_size=6 rows do not split over the mesh's data x fsdp = 8"):
        sh.check_batch_size("outer.batch_size", 6, sh.axis_sizes((8, 1, 1)))
    sh.check_batch_size("outer.batch_size", 6, sh.axis_sizes((2, 1, 4)))
    mesh = sh.make_mesh((2, 2, 2))
    assert mesh.axis_names == sh.MESH_AXES and all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_params_created_sharded_never_whole_on_one_device():
    mesh = sh.make_mesh((1, 2, 4))
    shardings = sh.param_shardings(CONFIG, mesh)
    params = sh.init_params_sharded(CONFIG, jax.random.key(0), shardings)
    q = params["layers"]["q_proj"]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(3, 32, 1, 16)}
    expected = np.asarray(init_params(CONFIG, jax.random.key(0))["layers"]["q_proj"])
    np.testing.assert_allclose(np.asarray(q), expected, rtol=1e-6, atol=1e-8)  # same draws, other fusion
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert sh.device_bytes(params) < total / 2
