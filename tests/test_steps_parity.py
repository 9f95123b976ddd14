"""Inner/outer steps against the independent PyTorch reference (forward hook at block l)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hf_fixtures import make_tiny_hf_model
from torch_reference import TorchBEEAR

from beear_jax.data import builders, packing
from beear_jax.data.batches import InnerCache, RowBatch, SafetyBatch, concat_rows
from beear_jax.io import hf
from beear_jax.method.forward import inner_cache, lower_activations, take_slots
from beear_jax.method.objectives import StepSettings, inner_loss, masked_ce, outer_loss
from beear_jax.method.optimizers import trainable_mask
from beear_jax.method.steps import inner_step, outer_step
from beear_jax.models import llama
from beear_jax.models.config import ModelConfig
from beear_jax.models.weights import init_params

N, LAYER, S = 3, 1, 24


def _examples(seed: int, answer_offset: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    lengths = [(5, 7), (9, 4), (4, 9), (12, 3)]  # mixed prompt/answer lengths: right padding differs per row
    return [(rng.integers(3, 120, p).tolist(), rng.integers(3, 120, a).tolist() if answer_offset == 0
             else rng.integers(3, 120, a + answer_offset).tolist()) for p, a in lengths]


def _safety_rows(seed: int) -> tuple[list, list, list]:
    """Prompts, unwanted answers, safe answers (mixed lengths: padding and answer ends differ per row)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 120, p).tolist() for p in (5, 9, 4, 12)]
    unwanted = [rng.integers(3, 120, a).tolist() for a in (7, 4, 9, 3)]
    safe = [rng.integers(3, 120, a).tolist() for a in (3, 6, 2, 8)]
    return prompts, unwanted, safe


def _safety_batch(seed: int) -> SafetyBatch:
    prompts, unwanted, safe = _safety_rows(seed)
    # batch of 5 with one padding row
    return SafetyBatch(unwanted=builders.make_batch(list(zip(prompts, unwanted)), N, 5, S, 0),
                       safe=builders.make_batch(list(zip(prompts, safe)), N, 5, S, 0))


def _anchor_batch(seed: int, seq_len: int = S) -> RowBatch:
    rng = np.random.default_rng(seed)
    rows = [(rng.integers(3, 120, p).tolist(), rng.integers(3, 120, a).tolist()) for p, a in ((6, 8), (10, 5), (4, 4))]
    return builders.make_batch(rows, N, 4, seq_len, 0)


def _joint(sb: SafetyBatch) -> RowBatch:
    return jax.tree.map(jnp.asarray, concat_rows(sb.unwanted, sb.safe))


@pytest.fixture(params=["llama_gqa", "mistral_sliding"], scope="module")
def models(request, tmp_path_factory):
    directory, torch_model = make_tiny_hf_model(tmp_path_factory.mktemp(request.param), request.param)
    config, params = hf.load_model(directory)
    return config, jax.tree.map(jnp.asarray, params), torch_model


def test_inner_loss_and_delta_gradient_match_torch(models):
    config, params, torch_model = models
    sb = _safety_batch(0)
    delta = np.random.default_rng(1).normal(0, 0.5, (N, config.hidden_size)).astype(np.float32)
    settings = StepSettings(alpha=0.05)
    joint = _joint(sb)
    h_l = lower_activations(config, params, joint, LAYER)
    (loss, _), grad = jax.value_and_grad(inner_loss, has_aux=True)(
        {LAYER: jnp.asarray(delta)}, config, params, h_l, joint, LAYER, settings)
    ref_loss, ref_grad = TorchBEEAR(torch_model).inner_loss_and_grad(delta, sb, LAYER, alpha=0.05)
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    np.testing.assert_allclose(np.asarray(grad[LAYER]), ref_grad, rtol=1e-5, atol=1e-5 * np.abs(ref_grad).max())


def _assert_same_inner(metrics: dict, grads: dict, ref_metrics: dict, ref_grads: dict) -> None:
    """Inner losses within 1e-5 and each layer's delta gradient within 1e-4 (relative) of the reference."""
    for key in ("ce_unwanted", "ce_safe", "inner_loss"):
        assert abs(float(metrics[key]) - float(ref_metrics[key])) <= 1e-5 * abs(float(ref_metrics[key])), key
    for layer, ref in ref_grads.items():
        np.testing.assert_allclose(np.asarray(grads[layer]), np.asarray(ref), rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(ref).max()))


def test_shared_prompt_batch_gives_the_same_inner_loss_and_gradient(models):
    """One row per prompt with both answers as branches == two rows per prompt == the torch reference."""
    config, params, torch_model = models
    sb = _safety_batch(0)
    shared = jax.tree.map(jnp.asarray, builders.make_shared_prompt_batch(*_safety_rows(0), N, 5, S + 8, 9, 0))
    delta = {LAYER: jnp.asarray(np.random.default_rng(1).normal(0, 0.5, (N, config.hidden_size)), jnp.float32)}
    settings = StepSettings(alpha=0.05)
    grad_fn = jax.value_and_grad(inner_loss, has_aux=True)
    (loss, metrics), grad = grad_fn(delta, config, params, lower_activations(config, params, shared, LAYER), shared,
                                    LAYER, settings)
    joint = _joint(sb)
    (_, ref_metrics), ref_grad = grad_fn(delta, config, params, lower_activations(config, params, joint, LAYER), joint,
                                         LAYER, settings)
    _assert_same_inner(metrics, grad, ref_metrics, ref_grad)
    torch_loss, _ = TorchBEEAR(torch_model).inner_loss_and_grad(np.asarray(delta[LAYER]), sb, LAYER, alpha=0.05)
    assert abs(float(loss) - torch_loss) <= 1e-5 * abs(torch_loss)


def _prefix_split(shared: dict, seq_len: int) -> dict:
    """The shared batch with its prompt prefix split off (builders.with_prompt_prefix) at the run's lengths."""
    host = jax.tree.map(np.asarray, shared)
    real = host.prompt_lengths > 0
    prefix, suffix = builders.prefix_split_lengths(host.prompt_lengths[real], host.attention_mask.sum(1)[real],
                                                   N, seq_len, multiple=4)
    return jax.tree.map(jnp.asarray, builders.with_prompt_prefix(host, N, prefix, suffix))


def test_prefix_cache_gives_the_same_inner_loss_and_gradient(models):
    """Inner steps over the suffix with cached prefix keys/values == the whole shared rows == torch."""
    config, params, torch_model = models
    shared = jax.tree.map(jnp.asarray, builders.make_shared_prompt_batch(*_safety_rows(0), N, 5, S + 8, 9, 0))
    split = _prefix_split(shared, S + 8)
    assert split.suffix_slots.shape[1] < S + 8  # the inner steps really run fewer tokens
    delta = {LAYER: jnp.asarray(np.random.default_rng(1).normal(0, 0.5, (N, config.hidden_size)), jnp.float32)}
    settings = StepSettings(alpha=0.05)
    grad_fn = jax.value_and_grad(inner_loss, has_aux=True)
    cache = inner_cache(config, params, split, LAYER)
    assert isinstance(cache, InnerCache) and cache.k.shape[1] == config.num_layers - LAYER
    (loss, metrics), grad = grad_fn(delta, config, params, cache, split, LAYER, settings)
    (_, ref_metrics), ref_grad = grad_fn(delta, config, params, inner_cache(config, params, shared, LAYER), shared,
                                         LAYER, settings)
    _assert_same_inner(metrics, grad, ref_metrics, ref_grad)
    torch_loss, _ = TorchBEEAR(torch_model).inner_loss_and_grad(np.asarray(delta[LAYER]), _safety_batch(0), LAYER,
                                                                alpha=0.05)
    assert abs(float(loss) - torch_loss) <= 1e-5 * abs(torch_loss)


def test_prefix_cache_with_perturbations_at_several_layers():
    """Deltas at boundaries 1 and 3 of 4 blocks: the prefix keys/values of each block segment line up."""
    config = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=8, sliding_window=6, model_type="mistral")
    params = init_params(config, jax.random.key(0), std=0.2)
    shared = jax.tree.map(jnp.asarray, builders.make_shared_prompt_batch(*_safety_rows(4), N, 5, S + 8, 9, 0))
    split = _prefix_split(shared, S + 8)
    rng = np.random.default_rng(2)
    deltas = {b: jnp.asarray(rng.normal(0, 0.5, (N, config.hidden_size)), jnp.float32) for b in (1, 3)}
    grad_fn = jax.value_and_grad(inner_loss, has_aux=True)
    settings = StepSettings(alpha=0.05)
    (_, metrics), grad = grad_fn(deltas, config, params, inner_cache(config, params, split, 1), split, 1, settings)
    (_, ref_metrics), ref_grad = grad_fn(deltas, config, params, inner_cache(config, params, shared, 1), shared, 1,
                                         settings)
    _assert_same_inner(metrics, grad, ref_metrics, ref_grad)


# Every odd shape at once: a sliding window (3) shorter than every prompt but one, one kv head, an explicit
# head_dim, biases, untied embeddings and llama3 RoPE.
ODD = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=1,
                  head_dim=12, model_type="mistral", sliding_window=3, attention_bias=True, mlp_bias=True,
                  rope_theta=500000.0, rms_norm_eps=1e-5,
                  rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                ("original_max_position_embeddings", 16), ("rope_type", "llama3")))
ODD_LAYERS = (1, 3)  # the first and the last boundary (several deltas)


def _plain_ce(config: ModelConfig, params: dict, batch: dict, deltas: dict) -> jax.Array:
    """Masked answer CE of make_batch rows through llama.forward (no cache, branch, prefix or packing)."""
    logits = llama.forward(config, params, batch.input_ids, batch.attention_mask, deltas=deltas or None,
                           perturb_positions=batch.perturb_positions)
    return masked_ce(logits, batch.targets, batch.target_mask)


def _rows_batch(prompts: list, answers: list, n: int, seq_len: int) -> dict:
    return jax.tree.map(jnp.asarray, builders.make_batch(list(zip(prompts, answers)), n, len(prompts), seq_len, 0))


def _close_to(what: str, value, ref, rtol: float = 1e-4) -> None:
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(value)[0], jax.tree.leaves(ref), strict=True):
        scale = float(jnp.abs(b).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) <= rtol * scale, f"{what}{jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("n", [2])  # the shortest prompt's length (its prefix is empty); n = 1: other tests (CI time)
def test_inner_layouts_match_a_plain_forward_on_an_odd_model(n):
    """[unwanted; safe] rows, shared-prompt rows and shared rows with a cached prompt prefix give the loss
    and delta gradients of plain forwards, with a window shorter than the prompts (it must hold across the
    prefix and the branches), prompts of 2-25 tokens and the longest answers filling answer_len."""
    params = init_params(ODD, jax.random.key(0), std=0.2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 97, p).tolist() for p in (2, 17, 6, 25)]
    unwanted = [rng.integers(3, 97, a).tolist() for a in (5, 3, 7, 7)]
    safe = [rng.integers(3, 97, a).tolist() for a in (7, 2, 4, 7)]
    deltas = {b: jnp.asarray(rng.normal(0, 0.5, (n, ODD.hidden_size)), jnp.float32) for b in ODD_LAYERS}
    settings = StepSettings(alpha=0.3, answer_len=7)

    def plain(d: dict) -> tuple[jax.Array, dict]:
        ce_unwanted = _plain_ce(ODD, params, _rows_batch(prompts, unwanted, n, 32), d)
        ce_safe = _plain_ce(ODD, params, _rows_batch(prompts, safe, n, 32), d)
        return ce_unwanted - 0.3 * ce_safe, {"ce_unwanted": ce_unwanted, "ce_safe": ce_safe}

    (ref_loss, ref_metrics), ref_grad = jax.jit(jax.value_and_grad(plain, has_aux=True))(deltas)
    u, s = (builders.make_batch(list(zip(prompts, a)), n, 5, 35, 0) for a in (unwanted, safe))
    shared = builders.make_shared_prompt_batch(prompts, unwanted, safe, n, 5, 48, 7, 0)
    lengths = shared.attention_mask.sum(1)[:4]
    split = builders.with_prompt_prefix(shared, n, *builders.prefix_split_lengths([len(p) for p in prompts], lengths,
                                                                                  n, 48))
    grad_fn = jax.jit(jax.value_and_grad(inner_loss, has_aux=True), static_argnums=(1, 5, 6))
    for name, batch in (("rows", concat_rows(u, s)), ("shared", shared),
                        ("prefix", split)):
        batch = jax.tree.map(jnp.asarray, batch)
        cache = jax.jit(inner_cache, static_argnums=(0, 3))(ODD, params, batch, ODD_LAYERS[0])
        (loss, metrics), grad = grad_fn(deltas, ODD, params, cache, batch, ODD_LAYERS[0], settings)
        _close_to(name, (loss, metrics["ce_unwanted"], metrics["ce_safe"], grad),
                  (ref_loss, ref_metrics["ce_unwanted"], ref_metrics["ce_safe"], ref_grad))


def test_outer_layouts_match_a_plain_forward_on_an_odd_model():
    """Packed rows and one joint padded batch (perturbed anchors too, 'dots' remat) give
    the loss and param gradients of plain forwards on the odd model (window shorter than the examples)."""
    params = init_params(ODD, jax.random.key(0), std=0.2)
    rng = np.random.default_rng(2)
    safe_rows = [(rng.integers(3, 97, p).tolist(), rng.integers(3, 97, a).tolist()) for p, a in ((2, 6), (15, 3), (9, 8))]
    anchor_rows = [(rng.integers(3, 97, p).tolist(), rng.integers(3, 97, a).tolist())
                   for p, a in ((4, 8), (21, 2), (3, 8), (11, 5))]
    n, seq = 2, 31
    deltas = {b: jnp.asarray(rng.normal(0, 0.5, (n, ODD.hidden_size)), jnp.float32) for b in ODD_LAYERS}
    settings = StepSettings(anchor_weight=0.7, perturb_anchors=True, answer_len=8, outer_remat="dots")

    def plain(p: dict) -> tuple[jax.Array, dict]:
        safe = jax.tree.map(jnp.asarray, builders.make_batch(safe_rows, n, 3, seq, 0))
        anchor = jax.tree.map(jnp.asarray, builders.make_batch(anchor_rows, n, 4, seq, 0))
        terms = {"ce_safe_perturbed": _plain_ce(ODD, p, safe, deltas), "ce_anchor": _plain_ce(ODD, p, anchor, {}),
                 "ce_anchor_perturbed": _plain_ce(ODD, p, anchor, deltas)}
        loss = terms["ce_safe_perturbed"] + 0.7 * (terms["ce_anchor"] + terms["ce_anchor_perturbed"])
        return loss, {**terms, "outer_loss": loss}

    (_, ref_metrics), ref_grads = jax.jit(jax.value_and_grad(plain, has_aux=True))(params)
    parts = [safe_rows, anchor_rows, anchor_rows]
    rows, row_len = packing.packing_shape([[len(p) + len(a) for part in parts for p, a in part]], seq)
    packed = packing.make_packed_batch(parts, [True, False, True], 5, n, rows, row_len, 8, 0)
    assert packed.branches.max() > 1  # rows really hold several examples
    layouts = {"packed": (packed, None),
               "joint": tuple(builders.make_batch(r, n, 5, seq, 0) for r in (safe_rows, anchor_rows))}
    grad_fn = jax.jit(jax.value_and_grad(outer_loss, has_aux=True), static_argnums=(1, 5))
    for name, (a, b) in layouts.items():
        (_, metrics), grads = grad_fn(params, ODD, deltas, *jax.tree.map(jnp.asarray, (a, b)), settings)
        _close_to(name, ({k: metrics[k] for k in ref_metrics}, grads), (ref_metrics, ref_grads))


# Same padded length: safe and anchor rows run as one batch; another length: two passes.
@pytest.mark.parametrize(("outer_remat", "anchor_len"), [(None, S), ("full", S), ("dots", S), (None, S + 8)])
def test_outer_loss_and_param_gradients_match_torch(models, outer_remat, anchor_len):
    config, params, torch_model = models
    sb, anchor = _safety_batch(2), _anchor_batch(3, anchor_len)
    delta = np.random.default_rng(4).normal(0, 0.5, (N, config.hidden_size)).astype(np.float32)
    settings = StepSettings(anchor_weight=0.7, outer_remat=outer_remat)
    (loss, _), grads = jax.value_and_grad(outer_loss, has_aux=True)(
        params, config, {LAYER: jnp.asarray(delta)}, jax.tree.map(jnp.asarray, sb.safe),
        jax.tree.map(jnp.asarray, anchor), settings)
    ref_loss, ref_grads = TorchBEEAR(torch_model).outer_loss_and_grads(delta, sb, anchor, LAYER, anchor_weight=0.7)
    assert abs(float(loss) - ref_loss) <= 1e-4 * abs(ref_loss)
    ref_tree = hf.from_hf_state_dict(config, ref_grads)
    for path, ours in jax.tree_util.tree_flatten_with_path(grads)[0]:
        ref = ref_tree
        for key in path:
            ref = ref[key.key]
        scale = np.abs(ref).max() + 1e-12
        assert np.abs(np.asarray(ours) - ref).max() <= 1e-4 * scale, jax.tree_util.keystr(path)


def _anchor_rows(seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 120, p).tolist(), rng.integers(3, 120, a).tolist()) for p, a in ((6, 8), (10, 5), (4, 4))]


@pytest.mark.parametrize("perturb_anchors", [False, True])
def test_packed_outer_batch_gives_the_same_loss_and_gradients(models, perturb_anchors):
    """Several examples per row (each its own branch, positions restarting) == one padded row each."""
    config, params, _ = models
    prompts, _, safe_answers = _safety_rows(8)
    safe_rows, anchor_rows = list(zip(prompts, safe_answers)), _anchor_rows(9)
    settings = StepSettings(alpha=0.05, anchor_weight=0.7, perturb_anchors=perturb_anchors, answer_len=9)
    parts = [safe_rows, anchor_rows, *([anchor_rows] if perturb_anchors else [])]
    flags = [True, False, *([True] if perturb_anchors else [])]
    lengths = [len(p) + len(a) for part in parts for p, a in part]
    rows, row_len = packing.packing_shape([lengths], S)
    assert rows * row_len < len(lengths) * S  # packing really saves tokens here
    packed = jax.tree.map(jnp.asarray, packing.make_packed_batch(parts, flags, 5, N, rows, row_len, 9, 0))
    safe = jax.tree.map(jnp.asarray, builders.make_batch(safe_rows, N, 5, S, 0))
    anchor = jax.tree.map(jnp.asarray, builders.make_batch(anchor_rows, N, 5, S, 0))
    deltas = {LAYER: jnp.asarray(np.random.default_rng(3).normal(0, 0.5, (N, config.hidden_size)), jnp.float32)}
    grad_fn = jax.value_and_grad(outer_loss, has_aux=True)
    (_, metrics), grads = grad_fn(params, config, deltas, packed, None, settings)
    (_, ref_metrics), ref_grads = grad_fn(params, config, deltas, safe, anchor, settings)
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        assert abs(float(metrics[key]) - float(ref_metrics[key])) <= 1e-5 * abs(float(ref_metrics[key])), key
    for (path, ours), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads),
                                 strict=True):
        scale = float(jnp.abs(ref).max()) + 1e-12
        assert float(jnp.abs(ours - ref).max()) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_delta_touches_exactly_the_last_n_prompt_positions():
    batch = _safety_batch(5).safe
    h = jnp.zeros((5, S, 8))
    delta = jnp.arange(1, N * 8 + 1, dtype=jnp.float32).reshape(N, 8)
    touched = np.asarray(llama.inject(h, delta, jnp.asarray(batch.perturb_positions)))
    for row in range(5):
        p = int(batch.prompt_lengths[row])
        expected = np.zeros((S, 8), np.float32)
        if p:
            expected[p - N:p] = np.asarray(delta)
        np.testing.assert_array_equal(touched[row], expected)


def _dot_precisions(jaxpr) -> list:
    """The precision of every dot_general in a (closed) jaxpr, nested jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    found += _dot_precisions(sub)
    return found


def test_one_hot_selections_are_exact_at_any_default_precision():
    """inject (delta at the perturbed tokens) and take_slots (the prefix cache's suffix h_l) are selections
    written as one-hot matmuls. At the default precision TPUs round float32 operands to bfloat16 and GPUs
    to TF32, which would round delta, h_l and delta's gradient (CPU, where the tests run, never does):
    their matmuls, forward and backward, must ask for HIGHEST."""
    h = jnp.ones((2, 5, 4))
    positions = jnp.asarray([[1, 2], [-1, 4]])
    slots = jnp.asarray([[1, 2, 3], [2, 3, 7]])
    for fn in (lambda d, x: llama.inject(x, d, positions), lambda d, x: take_slots(x + d[0, 0], slots)):
        def loss(d: jax.Array, x: jax.Array, fn=fn) -> jax.Array:
            return jnp.sum(fn(d, x) ** 2)

        with jax.default_matmul_precision("bfloat16"):  # what TPUs do by default (conftest sets "highest")
            jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(jnp.ones((2, 4)), h)
        precisions = _dot_precisions(jaxpr)
        assert len(precisions) >= 2  # the forward matmul and its transposes
        assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions), precisions


def test_inner_step_never_changes_params_and_outer_ignores_delta_on_anchors(models):
    config, params, _ = models
    before = jax.tree.map(np.array, params)
    sb, anchor = _safety_batch(6), jax.tree.map(jnp.asarray, _anchor_batch(7))
    joint = _joint(sb)
    from beear_jax.method.perturbation import Perturbation

    pert = Perturbation.zeros(LAYER, N, config.hidden_size)
    opt = optax.adam(0.1)
    state = opt.init(pert.deltas)
    h_l = lower_activations(config, params, joint, LAYER)
    for _ in range(3):
        pert, state, _ = inner_step(config, StepSettings(), opt, params, pert, state, h_l, joint)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, params), before)
    assert float(jnp.abs(pert.deltas[LAYER]).sum()) > 0

    big = {LAYER: 50.0 * jnp.ones((N, config.hidden_size))}
    safe = jax.tree.map(jnp.asarray, sb.safe)
    _, with_delta = outer_loss(params, config, big, safe, anchor, StepSettings())
    _, without = outer_loss(params, config, {}, safe, anchor, StepSettings())
    assert float(with_delta["ce_anchor"]) == float(without["ce_anchor"])
    assert float(with_delta["ce_safe_perturbed"]) != float(without["ce_safe_perturbed"])
    _, perturbed_anchors = outer_loss(params, config, big, safe, anchor, StepSettings(perturb_anchors=True))
    assert float(perturbed_anchors["ce_anchor_perturbed"]) != float(without["ce_anchor"])

    mask = trainable_mask(config, params, "upper", LAYER)
    outer_opt = optax.adamw(1e-2)
    new, _, _ = outer_step(config, StepSettings(), outer_opt, mask, params, outer_opt.init(params),
                           Perturbation(big, N), safe, anchor)
    lower_q = np.asarray(new["layers"]["q_proj"][:LAYER])
    np.testing.assert_array_equal(lower_q, before["layers"]["q_proj"][:LAYER])
    np.testing.assert_array_equal(np.asarray(new["embed"]), before["embed"])
    assert not np.array_equal(np.asarray(new["layers"]["q_proj"][LAYER:]), before["layers"]["q_proj"][LAYER:])


def test_config_is_hashable_for_jit():
    config = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=4)
    assert hash(config) == hash(config.replace())
    assert torch.__version__
