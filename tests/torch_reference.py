"""Independent PyTorch reference of BEEAR's inner (BEE) and outer (AR) steps, in the original code's style.

The model is a Hugging Face `LlamaForCausalLM` / `MistralForCausalLM`. The perturbation delta [n, d] is added by a
forward hook on decoder block `layer - 1` (so to h_l, the hidden states after `layer` blocks) at per-sample positions,
and the WHOLE model is recomputed at every step (no cached lower activations), as the original implementation does.
This module knows nothing about `beear_jax`: the JAX implementation is checked against it (parity tests) and timed
against it (benchmarks).

Batches are the RowBatches produced by `beear_jax.data.tables` (all [B, S] right-padded unless noted):
    input_ids int32, attention_mask int32, targets int32 (input_ids shifted left: the token that the logits at t
    predict), target_mask float32 (1 where targets[t] is an answer token), perturb_positions [B, n] int32 (the last
    n prompt tokens; -1 entries are skipped), prompt_lengths [B].
A safety batch is a beear_jax.data.batches.SafetyBatch (unwanted, safe) over the same prompts.

Losses (token means in float32):
    CE(batch)  = sum(target_mask * NLL(logits, targets)) / max(sum(target_mask), 1)
    inner      = CE(unwanted | delta) - alpha * CE(safe | delta)     (safe term optionally min(., safe_ce_clamp))
    outer      = CE(safe | delta) + anchor_weight * CE(anchor)       (delta is a constant; no delta on the anchor)
Positions passed to the model are position_ids = clip(cumsum(attention_mask) - 1, 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from beear_jax.data.batches import RowBatch, SafetyBatch

Batch = RowBatch


@dataclasses.dataclass(frozen=True)
class TorchBatch:
    """A token batch on the model's device, with the perturbation scatter indices precomputed (no host syncs later).

    `perturb_rows`, `perturb_cols`, `perturb_slots` list the valid (non -1) entries of perturb_positions: row b,
    sequence position, and which delta row (0..n-1) goes there.
    """

    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] int64
    position_ids: torch.Tensor  # [B, S] int64
    targets: torch.Tensor  # [B, S] int64, 0 where target_mask is 0
    target_mask: torch.Tensor  # [B, S] float32
    perturb_rows: torch.Tensor  # [K] int64
    perturb_cols: torch.Tensor  # [K] int64
    perturb_slots: torch.Tensor  # [K] int64
    num_slots: int  # n, the perturbation length the batch was built for

    @property
    def batch_size(self) -> int:
        """Number of rows B."""
        return int(self.input_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class TorchSafetyBatch:
    """A safety batch: `joint` = unwanted rows then safe rows in one [2B, S] batch (one forward), `safe` alone."""

    joint: TorchBatch
    safe: TorchBatch
    num_unwanted: int


@dataclasses.dataclass
class RoundResult:
    """What one BEEAR round produced: the final delta* and the per-step losses."""

    delta: np.ndarray  # [n, d] float32
    inner_losses: list[float]
    outer_losses: list[float]


def _pad_to(x: np.ndarray, length: int) -> np.ndarray:
    """Right-pad a [B, S] array with zeros to [B, length]."""
    return np.pad(x, ((0, 0), (0, length - x.shape[1]))) if x.shape[1] < length else x


def _concat_batches(a: Batch, b: Batch) -> RowBatch:
    """Concatenate two numpy batches along the batch axis, right-padding the shorter one to the same S."""
    seq = max(np.asarray(a.input_ids).shape[1], np.asarray(b.input_ids).shape[1])

    def joined(x: Any, y: Any, pad: bool) -> np.ndarray:
        x, y = np.asarray(x), np.asarray(y)
        return np.concatenate([_pad_to(x, seq), _pad_to(y, seq)] if pad else [x, y], axis=0)

    return RowBatch(*(joined(x, y, name in ("input_ids", "attention_mask", "targets", "target_mask"))
                      for name, x, y in zip(RowBatch._fields, a, b, strict=True)))


def to_torch_batch(batch: Batch | TorchBatch, device: torch.device | str = "cpu") -> TorchBatch:
    """Convert a numpy Batch dict to a TorchBatch on `device` (a TorchBatch is returned unchanged)."""
    if isinstance(batch, TorchBatch):
        return batch
    input_ids = np.asarray(batch.input_ids, dtype=np.int64)
    attention_mask = np.asarray(batch.attention_mask, dtype=np.int64)
    target_mask = np.asarray(batch.target_mask, dtype=np.float32)
    targets = np.where(target_mask > 0, np.asarray(batch.targets, dtype=np.int64), 0)
    position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
    positions = np.asarray(batch.perturb_positions, dtype=np.int64)
    rows, slots = np.nonzero(positions >= 0)

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)

    return TorchBatch(
        input_ids=t(input_ids),
        attention_mask=t(attention_mask),
        position_ids=t(position_ids),
        targets=t(targets),
        target_mask=t(target_mask),
        perturb_rows=t(rows.astype(np.int64)),
        perturb_cols=t(positions[rows, slots]),
        perturb_slots=t(slots.astype(np.int64)),
        num_slots=int(positions.shape[1]),
    )


def to_torch_safety_batch(
    batch: SafetyBatch | TorchSafetyBatch, device: torch.device | str = "cpu"
) -> TorchSafetyBatch:
    """Convert a SafetyBatch (unwanted, safe RowBatches) to a TorchSafetyBatch (unchanged if already converted)."""
    if isinstance(batch, TorchSafetyBatch):
        return batch
    unwanted, safe = batch.unwanted, batch.safe
    return TorchSafetyBatch(
        joint=to_torch_batch(_concat_batches(unwanted, safe), device),
        safe=to_torch_batch(safe, device),
        num_unwanted=int(np.asarray(unwanted.input_ids).shape[0]),
    )


def add_perturbation(hidden: torch.Tensor, delta: torch.Tensor, batch: TorchBatch) -> torch.Tensor:
    """Return hidden [B, S, d] with delta[i] added at (b, perturb_positions[b, i]) for every valid entry.

    Out of place (autograd-safe); differentiable w.r.t. both `hidden` and `delta`.
    """
    if hidden.shape[0] != batch.batch_size:
        raise ValueError(f"hook saw batch {hidden.shape[0]}, perturbation built for {batch.batch_size}")
    if delta.shape[0] != batch.num_slots:
        raise ValueError(f"delta has {delta.shape[0]} rows, batch has {batch.num_slots} perturbation slots")
    values = delta.to(hidden.dtype)[batch.perturb_slots]
    return hidden.index_put((batch.perturb_rows, batch.perturb_cols), values, accumulate=True)


def token_nll(logits: torch.Tensor, batch: TorchBatch) -> torch.Tensor:
    """Per-token NLL [B, S] in float32, multiplied by target_mask."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
    return nll.view(batch.targets.shape) * batch.target_mask


def masked_ce(logits: torch.Tensor, batch: TorchBatch) -> torch.Tensor:
    """Token-mean CE over answer tokens of the whole batch: sum(mask * NLL) / max(sum(mask), 1)."""
    return token_nll(logits, batch).sum() / batch.target_mask.sum().clamp(min=1.0)


class TorchBEEAR:
    """BEEAR steps on a Hugging Face Llama/Mistral causal LM, whole model recomputed every step.

    Args:
        model: a `LlamaForCausalLM` or `MistralForCausalLM` (anything with `model.model.layers`).
        dtype: optional dtype to cast the model to (float32 default; bfloat16 for speed). Losses are float32.
        device: optional device to move the model to (default: where the model already is).
        outer_optimizer: "adamw" (torch.optim.AdamW) or "sgd" (torch.optim.SGD) on all trainable params.
        outer_lr: outer learning rate.
        weight_decay: AdamW/SGD weight decay (default 0: the method has no decay term).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        outer_optimizer: Literal["adamw", "sgd"] = "adamw",
        outer_lr: float = 2e-5,
        weight_decay: float = 0.0,
    ) -> None:
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()  # no dropout; the steps below enable grads explicitly where needed
        self.device = next(model.parameters()).device
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        self.hidden_size = int(model.config.hidden_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if outer_optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.params, lr=outer_lr, weight_decay=weight_decay
            )
        elif outer_optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=outer_lr, weight_decay=weight_decay)
        else:
            raise ValueError(f"unknown outer optimizer {outer_optimizer!r}")

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        attn_implementation: str = "sdpa",
        **kwargs: Any,
    ) -> TorchBEEAR:
        """Load an HF checkpoint directory (Llama or Mistral) and wrap it; kwargs go to the constructor."""
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
        return cls(model, device=device, **kwargs)

    # ----------------------------------------------------------------------------------------------- plumbing

    def prepare(self, batch: Batch | TorchBatch) -> TorchBatch:
        """A numpy Batch -> TorchBatch on the model's device (do this once, outside timed loops)."""
        return to_torch_batch(batch, self.device)

    def prepare_safety(self, batch: SafetyBatch | TorchSafetyBatch) -> TorchSafetyBatch:
        """A numpy SafetyBatch -> TorchSafetyBatch on the model's device."""
        return to_torch_safety_batch(batch, self.device)

    def _check_layer(self, layer: int) -> None:
        if not 1 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [1, {self.num_layers}), got {layer}")

    @contextlib.contextmanager
    def inject(self, layer: int, delta: torch.Tensor, batch: TorchBatch) -> Iterator[None]:
        """Within the context, the output of block `layer - 1` (i.e. h_layer) gets delta added at the batch's positions.

        The hook is prepended so that HF's `output_hidden_states` recorder sees the perturbed h_layer.
        """
        self._check_layer(layer)

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):  # older transformers return (hidden, ...) from a decoder layer
                return (add_perturbation(output[0], delta, batch), *output[1:])
            return add_perturbation(output, delta, batch)

        handle = self.layers[layer - 1].register_forward_hook(hook, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Within the context, the model params do not require grad (the inner level's frozen model)."""
        flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(self.params, flags, strict=True):
                p.requires_grad_(flag)

    def logits(
        self, batch: Batch | TorchBatch, delta: torch.Tensor | None = None, layer: int | None = None
    ) -> torch.Tensor:
        """Full-model logits [B, S, V]; with `delta` (and `layer`) the perturbation is injected at h_layer."""
        batch = self.prepare(batch)
        kwargs = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
            "use_cache": False,
        }
        if delta is None:
            return self.model(**kwargs).logits
        if layer is None:
            raise ValueError("layer is required with a delta")
        with self.inject(layer, delta, batch):
            return self.model(**kwargs).logits

    def _delta_tensor(self, delta: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A detached float32 copy of delta on the model's device."""
        if torch.is_tensor(delta):
            return delta.detach().to(self.device, torch.float32)
        return torch.from_numpy(np.array(delta, dtype=np.float32)).to(self.device)

    # ----------------------------------------------------------------------------------------------- losses

    def inner_terms(
        self, delta: torch.Tensor, batch: SafetyBatch | TorchSafetyBatch, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE(unwanted | delta), CE(safe | delta)) from ONE forward over the [unwanted; safe] batch."""
        batch = self.prepare_safety(batch)
        joint, b = batch.joint, batch.num_unwanted
        nll = token_nll(self.logits(joint, delta, layer), joint)
        mask = joint.target_mask
        ce_unwanted = nll[:b].sum() / mask[:b].sum().clamp(min=1.0)
        ce_safe = nll[b:].sum() / mask[b:].sum().clamp(min=1.0)
        return ce_unwanted, ce_safe

    def inner_loss(
        self,
        delta: torch.Tensor,
        batch: SafetyBatch | TorchSafetyBatch,
        layer: int,
        alpha: float = 0.05,
        safe_ce_clamp: float | None = None,
    ) -> torch.Tensor:
        """CE(unwanted | delta) - alpha * [min(]CE(safe | delta)[, safe_ce_clamp)] as a scalar tensor."""
        ce_unwanted, ce_safe = self.inner_terms(delta, batch, layer)
        if safe_ce_clamp is not None:
            ce_safe = ce_safe.clamp(max=safe_ce_clamp)
        return ce_unwanted - alpha * ce_safe

    def outer_loss(
        self,
        delta: torch.Tensor,
        safety_batch: SafetyBatch | TorchSafetyBatch,
        anchor_batch: Batch | TorchBatch,
        layer: int,
        anchor_weight: float = 1.0,
        backward: bool = False,
    ) -> torch.Tensor:
        """CE(safe | delta) + anchor_weight * CE(anchor), delta detached; with `backward`, grads accumulate into params.

        With `backward` the two terms are back-propagated one after the other (same gradient, lower peak memory)
        and the returned loss is detached.
        """
        delta = delta.detach()
        safe = self.prepare_safety(safety_batch).safe
        anchor = self.prepare(anchor_batch)
        safe_ce = masked_ce(self.logits(safe, delta, layer), safe)
        if backward:
            safe_ce.backward()
            safe_ce = safe_ce.detach()
        anchor_term = anchor_weight * masked_ce(self.logits(anchor), anchor)
        if backward:
            anchor_term.backward()
            anchor_term = anchor_term.detach()
        return safe_ce + anchor_term

    # ----------------------------------------------------------------------------------------------- numpy API

    def inner_loss_and_grad(
        self,
        delta: np.ndarray,
        safety_batch: SafetyBatch | TorchSafetyBatch,
        layer: int,
        alpha: float = 0.05,
        safe_ce_clamp: float | None = None,
    ) -> tuple[float, np.ndarray]:
        """Inner loss and its gradient w.r.t. delta [n, d] (model frozen)."""
        delta_t = self._delta_tensor(delta).requires_grad_(True)
        with self.frozen():
            loss = self.inner_loss(delta_t, safety_batch, layer, alpha, safe_ce_clamp)
            (grad,) = torch.autograd.grad(loss, delta_t)
        return float(loss.detach()), grad.detach().cpu().numpy()

    def outer_loss_and_grads(
        self,
        delta: np.ndarray,
        safety_batch: SafetyBatch | TorchSafetyBatch,
        anchor_batch: Batch | TorchBatch,
        layer: int,
        anchor_weight: float = 1.0,
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Outer loss and its gradient w.r.t. every trainable param, keyed by HF parameter name (params untouched)."""
        self.model.zero_grad(set_to_none=True)
        loss = self.outer_loss(self._delta_tensor(delta), safety_batch, anchor_batch, layer, anchor_weight, True)
        grads = {
            name: (np.zeros(p.shape, np.float32) if p.grad is None else p.grad.detach().float().cpu().numpy())
            for name, p in self.model.named_parameters()
            if p.requires_grad
        }
        self.model.zero_grad(set_to_none=True)
        return float(loss), grads

    # ----------------------------------------------------------------------------------------------- steps

    def new_delta(self, num_tokens: int, lr: float) -> tuple[torch.nn.Parameter, torch.optim.Adam]:
        """A zero delta [n, d] (float32, on the model's device) and a fresh torch.optim.Adam for it."""
        delta = torch.nn.Parameter(torch.zeros(num_tokens, self.hidden_size, device=self.device))
        return delta, torch.optim.Adam([delta], lr=lr)

    def _inner_step(
        self,
        delta: torch.nn.Parameter,
        delta_opt: torch.optim.Optimizer,
        safety_batch: SafetyBatch | TorchSafetyBatch,
        layer: int,
        alpha: float,
        safe_ce_clamp: float | None,
    ) -> torch.Tensor:
        delta_opt.zero_grad(set_to_none=True)
        with self.frozen():
            loss = self.inner_loss(delta, safety_batch, layer, alpha, safe_ce_clamp)
            loss.backward()
        delta_opt.step()
        return loss.detach()

    def inner_step(
        self,
        delta: torch.nn.Parameter,
        delta_opt: torch.optim.Optimizer,
        safety_batch: SafetyBatch | TorchSafetyBatch,
        layer: int,
        alpha: float = 0.05,
        safe_ce_clamp: float | None = None,
    ) -> float:
        """One BEE step: the whole model runs, delta is updated in place by `delta_opt`, params stay fixed.

        Returns the loss before the update.
        """
        return float(self._inner_step(delta, delta_opt, safety_batch, layer, alpha, safe_ce_clamp))

    def _outer_step(
        self,
        delta: torch.Tensor,
        safety_batch: SafetyBatch | TorchSafetyBatch,
        anchor_batch: Batch | TorchBatch,
        layer: int,
        anchor_weight: float,
    ) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.outer_loss(delta, safety_batch, anchor_batch, layer, anchor_weight, backward=True)
        self.optimizer.step()
        return loss

    def outer_step(
        self,
        delta: torch.Tensor | np.ndarray,
        safety_batch: SafetyBatch | TorchSafetyBatch,
        anchor_batch: Batch | TorchBatch,
        layer: int,
        anchor_weight: float = 1.0,
    ) -> float:
        """One AR step: params updated in place by `self.optimizer` with delta held constant. Returns the loss."""
        return float(self._outer_step(self._delta_tensor(delta), safety_batch, anchor_batch, layer, anchor_weight))

    def run_round(
        self,
        safety_batches: Sequence[SafetyBatch | TorchSafetyBatch],
        anchor_batches: Sequence[Batch | TorchBatch],
        layer: int,
        *,
        inner_steps: int,
        inner_lr: float = 0.1,
        alpha: float = 0.05,
        safe_ce_clamp: float | None = None,
        anchor_weight: float = 1.0,
        outer_steps: int | None = None,
    ) -> RoundResult:
        """One BEEAR round: delta = 0; `inner_steps` Adam steps on delta cycling over `safety_batches`; then
        `outer_steps` (default len(safety_batches)) outer steps, step i on safety_batches[i % len] with
        anchor_batches[i % len]. Losses are synchronised once at the end (no per-step host sync).
        """
        if not safety_batches or not anchor_batches:
            raise ValueError("need at least one safety batch and one anchor batch")
        safety = [self.prepare_safety(b) for b in safety_batches]
        anchors = [self.prepare(b) for b in anchor_batches]
        delta, delta_opt = self.new_delta(safety[0].safe.num_slots, inner_lr)
        inner = [
            self._inner_step(delta, delta_opt, safety[i % len(safety)], layer, alpha, safe_ce_clamp)
            for i in range(inner_steps)
        ]
        n_outer = len(safety) if outer_steps is None else outer_steps
        outer = [
            self._outer_step(delta, safety[i % len(safety)], anchors[i % len(anchors)], layer, anchor_weight)
            for i in range(n_outer)
        ]
        inner_losses = torch.stack(inner).tolist() if inner else []
        outer_losses = torch.stack(outer).tolist() if outer else []
        return RoundResult(delta.detach().cpu().numpy(), inner_losses, outer_losses)

    def params_numpy(self) -> dict[str, np.ndarray]:
        """A float32 numpy copy of every parameter, keyed by HF parameter name."""
        return {name: p.detach().float().cpu().numpy().copy() for name, p in self.model.named_parameters()}
