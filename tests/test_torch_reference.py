"""Sanity tests of the PyTorch BEEAR reference (tests/torch_reference.py) on tiny random HF models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_reference import TorchBEEAR, masked_ce, to_torch_batch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from beear_jax.data.batches import RowBatch, SafetyBatch

VOCAB = 128
HIDDEN = 64
N_TOKENS = 3
LAYER = 2
SEQ = 16


def _config_kwargs() -> dict:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
    }


def _make_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**_config_kwargs()))
    # A sliding window shorter than the sequences, so the Mistral mask path is exercised.
    return MistralForCausalLM(MistralConfig(sliding_window=8, **_config_kwargs()))


def _build(prompts: list[np.ndarray], answers: list[np.ndarray], seq: int, n: int) -> RowBatch:
    """A right-padded RowBatch as beear_jax.data.tables builds one, built by hand."""
    rows = len(prompts)
    batch = RowBatch(
        input_ids=np.zeros((rows, seq), np.int32),
        attention_mask=np.zeros((rows, seq), np.int32),
        targets=np.zeros((rows, seq), np.int32),
        target_mask=np.zeros((rows, seq), np.float32),
        perturb_positions=np.full((rows, n), -1, np.int32),
        prompt_lengths=np.array([len(p) for p in prompts], np.int32),
    )
    for b, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        tokens = np.concatenate([prompt, answer])
        length, plen = len(tokens), len(prompt)
        batch.input_ids[b, :length] = tokens
        batch.attention_mask[b, :length] = 1
        batch.targets[b, : length - 1] = tokens[1:]
        batch.target_mask[b, plen - 1 : length - 1] = 1.0
        k = min(n, plen)
        batch.perturb_positions[b, n - k :] = np.arange(plen - k, plen)
    return batch


def _tokens(rng: np.random.Generator, length: int) -> np.ndarray:
    return rng.integers(1, VOCAB, size=length).astype(np.int32)


def _safety_batch(seed: int = 0) -> SafetyBatch:
    rng = np.random.default_rng(seed)
    # The third prompt is shorter than N_TOKENS, so its perturb_positions start with -1.
    prompts = [_tokens(rng, m) for m in (6, 9, 2)]
    unwanted = [_tokens(rng, m) for m in (4, 5, 3)]
    safe = [_tokens(rng, m) for m in (3, 6, 4)]
    return SafetyBatch(unwanted=_build(prompts, unwanted, SEQ, N_TOKENS), safe=_build(prompts, safe, SEQ, N_TOKENS))


def _anchor_batch(seed: int = 1) -> RowBatch:
    rng = np.random.default_rng(seed)
    prompts = [_tokens(rng, m) for m in (5, 4)]
    answers = [_tokens(rng, m) for m in (6, 3)]
    return _build(prompts, answers, 12, N_TOKENS)


def _hf_ce(model: torch.nn.Module, batch: dict[str, np.ndarray]) -> float:
    """CE through HF's own loss: labels = next-token ids on answer targets, -100 elsewhere."""
    labels = np.full(batch.input_ids.shape, -100, np.int64)
    labels[:, 1:] = np.where(batch.target_mask[:, :-1] > 0, batch.targets[:, :-1], -100)
    mask = torch.from_numpy(batch.attention_mask.astype(np.int64))
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(batch.input_ids.astype(np.int64)),
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
            labels=torch.from_numpy(labels),
            use_cache=False,
        )
    return float(out.loss)


@pytest.fixture(params=["llama", "mistral"])
def ref(request: pytest.FixtureRequest) -> TorchBEEAR:
    return TorchBEEAR(_make_model(request.param), outer_lr=1e-3)


def test_zero_delta_inner_loss_matches_hf_loss(ref: TorchBEEAR) -> None:
    sb = _safety_batch()
    ce_unwanted, ce_safe = _hf_ce(ref.model, sb.unwanted), _hf_ce(ref.model, sb.safe)
    zero = np.zeros((N_TOKENS, HIDDEN), np.float32)
    loss, grad = ref.inner_loss_and_grad(zero, sb, LAYER, alpha=0.05)
    np.testing.assert_allclose(loss, ce_unwanted - 0.05 * ce_safe, rtol=1e-5, atol=1e-5)
    assert grad.shape == (N_TOKENS, HIDDEN) and np.abs(grad).sum() > 0
    clamp = ce_safe - 0.5
    loss_clamped, grad_clamped = ref.inner_loss_and_grad(zero, sb, LAYER, alpha=0.5, safe_ce_clamp=clamp)
    np.testing.assert_allclose(loss_clamped, ce_unwanted - 0.5 * clamp, rtol=1e-5, atol=1e-5)
    # With the safe term clamped, the gradient is that of CE(unwanted) alone.
    _, grad_unwanted = ref.inner_loss_and_grad(zero, sb, LAYER, alpha=0.0)
    np.testing.assert_allclose(grad_clamped, grad_unwanted, rtol=1e-5, atol=1e-8)


def test_hook_touches_exactly_the_given_positions(ref: TorchBEEAR) -> None:
    batch = to_torch_batch(_safety_batch().unwanted)
    delta = torch.randn(N_TOKENS, HIDDEN, generator=torch.Generator().manual_seed(0))
    kwargs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
        "use_cache": False,
        "output_hidden_states": True,
    }
    with torch.no_grad():
        clean = ref.model(**kwargs).hidden_states
        with ref.inject(LAYER, delta, batch):
            perturbed = ref.model(**kwargs).hidden_states
    expected = torch.zeros_like(clean[LAYER])
    positions = _safety_batch().unwanted.perturb_positions
    for b in range(positions.shape[0]):
        for i in range(N_TOKENS):
            if positions[b, i] >= 0:
                expected[b, positions[b, i]] = delta[i]
    for j in range(LAYER):  # blocks before the boundary are untouched
        torch.testing.assert_close(perturbed[j], clean[j], rtol=0, atol=0)
    torch.testing.assert_close(perturbed[LAYER] - clean[LAYER], expected, rtol=0, atol=1e-6)
    # Downstream, tokens before each row's first perturbed position are unaffected (causal attention) ...
    first = np.where(positions >= 0, positions, 10**6).min(axis=1)
    for b in range(positions.shape[0]):
        torch.testing.assert_close(perturbed[LAYER + 1][b, : first[b]], clean[LAYER + 1][b, : first[b]])
        # ... and the perturbed ones are.
        assert (perturbed[LAYER + 1][b, first[b]] - clean[LAYER + 1][b, first[b]]).abs().max() > 1e-3


def test_joint_forward_equals_separate_forwards(ref: TorchBEEAR) -> None:
    sb = _safety_batch()
    delta = 0.5 * torch.randn(N_TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ce_unwanted, ce_safe = ref.inner_terms(delta, sb, LAYER)
        unwanted, safe = to_torch_batch(sb.unwanted), to_torch_batch(sb.safe)
        sep_unwanted = ref.logits(unwanted, delta, LAYER)
        sep_safe = ref.logits(safe, delta, LAYER)
    torch.testing.assert_close(ce_unwanted, masked_ce(sep_unwanted, unwanted), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce_safe, masked_ce(sep_safe, safe), rtol=1e-5, atol=1e-6)


def test_inner_grad_matches_finite_difference(ref: TorchBEEAR) -> None:
    sb = _safety_batch()
    delta = (0.3 * np.random.default_rng(2).standard_normal((N_TOKENS, HIDDEN))).astype(np.float32)
    _, grad = ref.inner_loss_and_grad(delta, sb, LAYER, alpha=0.05)

    def central_difference(direction: np.ndarray, eps: float = 3e-2) -> float:
        plus = ref.inner_loss_and_grad(delta + eps * direction, sb, LAYER)[0]
        minus = ref.inner_loss_and_grad(delta - eps * direction, sb, LAYER)[0]
        return (plus - minus) / (2 * eps)

    # The largest gradient coordinate (one of the prompt's perturbed rows) ...
    i, j = np.unravel_index(np.argmax(np.abs(grad)), grad.shape)
    unit = np.zeros_like(delta)
    unit[i, j] = 1.0
    np.testing.assert_allclose(grad[i, j], central_difference(unit), rtol=3e-3)
    # ... and a random direction through all coordinates.
    direction = np.random.default_rng(3).standard_normal(delta.shape).astype(np.float32)
    direction /= np.linalg.norm(direction)
    np.testing.assert_allclose(np.sum(grad * direction), central_difference(direction, eps=5e-2), rtol=5e-3)


def test_outer_loss_and_grads(ref: TorchBEEAR) -> None:
    sb, anchor = _safety_batch(), _anchor_batch()
    before = ref.params_numpy()
    zero = np.zeros((N_TOKENS, HIDDEN), np.float32)
    loss, grads = ref.outer_loss_and_grads(zero, sb, anchor, LAYER, anchor_weight=0.7)
    np.testing.assert_allclose(loss, _hf_ce(ref.model, sb.safe) + 0.7 * _hf_ce(ref.model, anchor), rtol=1e-5)
    assert set(grads) == {name for name, _ in ref.model.named_parameters()}
    assert all(g.shape == before[k].shape for k, g in grads.items())
    assert np.abs(grads["model.layers.0.self_attn.q_proj.weight"]).sum() > 0
    for name, value in ref.params_numpy().items():
        np.testing.assert_array_equal(value, before[name])
    assert all(p.grad is None for p in ref.model.parameters())


def test_outer_step_changes_params_and_inner_step_does_not(ref: TorchBEEAR) -> None:
    sb, anchor = _safety_batch(), _anchor_batch()
    before = ref.params_numpy()
    delta, delta_opt = ref.new_delta(N_TOKENS, lr=0.1)
    loss = ref.inner_step(delta, delta_opt, sb, LAYER)
    assert np.isfinite(loss)
    assert delta.abs().sum() > 0
    for name, value in ref.params_numpy().items():
        np.testing.assert_array_equal(value, before[name])
    delta_before = delta.detach().clone()
    loss = ref.outer_step(delta, sb, anchor, LAYER)
    assert np.isfinite(loss)
    torch.testing.assert_close(delta.detach(), delta_before, rtol=0, atol=0)
    after = ref.params_numpy()
    assert all(not np.array_equal(after[name], before[name]) for name in before)


def test_inner_steps_decrease_inner_loss(ref: TorchBEEAR) -> None:
    sb = ref.prepare_safety(_safety_batch())
    delta, delta_opt = ref.new_delta(N_TOKENS, lr=0.1)
    losses = [ref.inner_step(delta, delta_opt, sb, LAYER) for _ in range(10)]
    assert losses[-1] < losses[0]


def test_run_round() -> None:
    ref = TorchBEEAR(_make_model("llama"), outer_lr=1e-3)
    before = ref.params_numpy()
    result = ref.run_round([_safety_batch(0), _safety_batch(3)], [_anchor_batch()], LAYER, inner_steps=3)
    assert result.delta.shape == (N_TOKENS, HIDDEN) and np.abs(result.delta).sum() > 0
    assert len(result.inner_losses) == 3 and len(result.outer_losses) == 2
    assert np.all(np.isfinite(result.inner_losses + result.outer_losses))
    assert not np.array_equal(ref.params_numpy()["lm_head.weight"], before["lm_head.weight"])


def test_bfloat16_runs() -> None:
    ref = TorchBEEAR(_make_model("llama"), dtype=torch.bfloat16)
    sb = _safety_batch()
    loss, grad = ref.inner_loss_and_grad(np.zeros((N_TOKENS, HIDDEN), np.float32), sb, LAYER)
    assert grad.dtype == np.float32 and np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(
        loss, _hf_ce(ref.model, sb.unwanted) - 0.05 * _hf_ce(ref.model, sb.safe), rtol=2e-2
    )


def test_bad_layer_rejected(ref: TorchBEEAR) -> None:
    zero = np.zeros((N_TOKENS, HIDDEN), np.float32)
    for layer in (0, 3):
        with pytest.raises(ValueError, match="layer"):
            ref.inner_loss_and_grad(zero, _safety_batch(), layer)
