"""`beear plan`: bytes per device of a BEEAR run on a mesh, computed without allocating anything.

Persistent arrays (params, the outer optimizer state, delta and its optimizer state, the h_l cache,
the batches) are sized exactly from their shapes (jax.eval_shape) and the shardings `beear run`
gives them (beear_jax.parallel.sharding), so these numbers match a real run byte for byte. The temporaries
of each step come from XLA's memory analysis of the compiled step when the mesh fits the visible
devices (simulate more CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N), and
from an analytical estimate otherwise. XLA:CPU's buffer assignment differs from GPU/TPU (no fused
attention, bfloat16 often widened to float32), so compiled CPU temporaries are an upper estimate.

Over 400 lines: the shapes, byte counts, compiled temporaries and the printed plan of one run share RunShapes
and read as one computation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from beear_jax.config.schema import DataSection, RunSettings
from beear_jax.config.settings import settings_from_config
from beear_jax.data import builders, tables
from beear_jax.data.batches import PackedBatch, PrefixSplitBatch, RowBatch, SharedPromptBatch
from beear_jax.method.forward import inner_cache
from beear_jax.method.objectives import StepSettings, outer_parts
from beear_jax.method.optimizers import make_optimizer
from beear_jax.method.perturbation import PAPER_WINDOWS, Perturbation
from beear_jax.method.round_plan import check_perturb_layers, delta_rows, inner_rows, perturb_layers, step_settings
from beear_jax.method.steps import make_steps
from beear_jax.models.config import ModelConfig
from beear_jax.parallel import sharding as sh

GB = 1e9


# ---- model shapes ----------------------------------------------------------------------------------


def llama2_7b() -> ModelConfig:
    """meta-llama/Llama-2-7b-chat-hf (bfloat16 compute)."""
    return ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5, dtype="bfloat16")


def mistral_7b() -> ModelConfig:
    """mistralai/Mistral-7B-Instruct-v0.2 (GQA with 8 kv heads; bfloat16 compute)."""
    return ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, model_type="mistral", rope_theta=1e6, rms_norm_eps=1e-5,
                       max_position_embeddings=32768, dtype="bfloat16")


def qwen25_7b() -> ModelConfig:
    """Qwen/Qwen2.5-7B-Instruct (GQA with 4 kv heads, q/k/v biases, untied embeddings; bfloat16 compute)."""
    return ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, head_dim=128, model_type="qwen2", qkv_bias=True, rope_theta=1e6,
                       rms_norm_eps=1e-6, max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645,
                       dtype="bfloat16")


def smollm2_135m() -> ModelConfig:
    """HuggingFaceTB/SmolLM2-135M-Instruct (tied embeddings; float32 on CPU)."""
    return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                       num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


PRESETS = {"llama2-7b": llama2_7b, "mistral-7b": mistral_7b, "qwen2.5-7b": qwen25_7b, "smollm2-135m": smollm2_135m}


def model_config_of(path: str, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of an HF directory (config.json) or a .gguf file, without reading weights."""
    if not str(path).strip():
        raise FileNotFoundError(f"model.path is empty: set --config.model.path=MODEL, or pass --model PRESET "
                                f"({', '.join(PRESETS)}) to plan without the model files.")
    p = pathlib.Path(path).expanduser()
    if (p / "config.json").is_file():
        return ModelConfig.from_hf_dict(json.loads((p / "config.json").read_text()), dtype=dtype)
    ggufs = [p] if p.suffix == ".gguf" else sorted(p.glob("*.gguf")) if p.is_dir() else []
    if len(ggufs) != 1 or not ggufs[0].is_file():
        raise FileNotFoundError(f"{path}: no config.json or single .gguf file; pass --model PRESET "
                                f"({', '.join(PRESETS)}) to plan without the model files.")
    from beear_jax.io import gguf as hf_gguf

    hf = hf_gguf.read_gguf_config(ggufs[0])
    if "head_dim" not in hf:  # qwen2 / qwen3: transformers' GGUF config has none (hf.load_model reads it so too)
        hf["head_dim"] = hf_gguf.gguf_head_dim(hf_gguf.open_gguf(ggufs[0]))
    return ModelConfig.from_hf_dict(hf, dtype=dtype)


# ---- the plan ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunShapes:
    """The static shapes of a run: what the data would pad to."""

    num_inner_batches: int
    inner_rows: int  # inner.batch_size (shared prompts), else 2 x: unwanted and safe answers of the same prompts
    outer_rows: int
    seq_len: int
    answer_len: int
    perturb_length: int
    layers: tuple[int, ...]
    shared_prompt: bool
    inner_seq_len: int  # the inner rows' length: a prompt with both answers when shared_prompt, else seq_len
    # inner.cache_prefix (0, 0 without): the cached prompt prefix and the rows' rest that the inner steps run
    prefix_len: int = 0
    suffix_len: int = 0
    # outer.pack ((0, 0) without): rows and row length of the packed outer batch (all parts of a step)
    packed: tuple[int, int] = (0, 0)
    outer_parts: int = 2  # safe under delta, anchors [, anchors under delta]


@dataclasses.dataclass
class Plan:
    """Bytes per device of one run on one mesh."""

    model: ModelConfig
    mesh: tuple[int, int, int]
    shapes: RunShapes
    arrays: dict[str, int]  # persistent arrays, exact
    temps: dict[str, int]  # per step: XLA's temporaries, or the analytical estimate
    temps_source: str
    analytical_temps: dict[str, int]

    @property
    def persistent(self) -> int:
        return sum(self.arrays.get(k, 0) for k in ("params", "reference", "outer_state", "masks", "delta",
                                                  "inner_state"))

    @property
    def phases(self) -> dict[str, int]:
        """Peak of each phase: the h_l cache lives through the inner epochs and is freed before the outer."""
        inner = self.persistent + self.arrays["h_cache"] + self.arrays["inner_batches"] + max(
            self.temps["lower_stack"], self.temps["inner_epoch"])
        return {"inner": inner, "outer": self.persistent + self.arrays["outer_batches"] + self.temps["outer_step"]}

    @property
    def peak(self) -> int:
        return max(self.phases.values())


def safety_rows(data: DataSection) -> int:
    """The rows of data.safety: what inner.samples=0 ("all rows") means; the config alone cannot say."""
    if not data.safety:
        raise ValueError("inner.samples=0 uses all rows of data.safety, which is not set: set "
                         "--config.data.safety=FILE to count them, or --config.inner.samples=N.")
    return len(tables.load_table(data.safety, data.safety_columns.as_dict(), key="data.safety"))


def run_shapes(settings: RunSettings, seq_len: int | None = None, answer_len: int | None = None,
               inner_seq_len: int | None = None, prefix_len: int | None = None,
               suffix_len: int | None = None, packed: tuple[int, int] | None = None) -> RunShapes:
    """Shapes from the config alone: inner.samples prompts, the largest bucket, max_answer_tokens (a prompt
    with both answers then fits seq_len + answer_len; its prefix at most seq_len - perturb.length tokens),
    unless the data's lengths are given (beear.DefenderData). A packed outer batch: from the config alone,
    the worst case (one seq_len row per example), unless `packed` (beear.packed_shape) is given."""
    inner, outer, perturb, data = settings.inner, settings.outer, settings.perturb, settings.data
    layers = perturb_layers(perturb)
    samples = inner.samples or safety_rows(data)
    _, rows = inner_rows(inner)
    seq = int(seq_len or max(data.buckets))
    answer = int(answer_len or data.max_answer_tokens)
    shared = inner.share_prompt
    if not shared:
        inner_seq_len = seq
    elif not inner_seq_len:
        inner_seq_len = builders.shared_prompt_length(seq + answer, data.buckets)
    n = delta_rows(perturb)
    if shared and inner.cache_prefix:
        # Config alone: a prompt of up to seq - 1 tokens, two answers of up to `answer` tokens; a window in the
        # user's text may start right after the template's first tokens, so then nothing is counted as prefix.
        before = perturb.length if perturb.windows == PAPER_WINDOWS else seq - 1
        fallback = builders.prefix_split_lengths([seq - 1], [seq - 1 + 2 * answer], before, int(inner_seq_len))
        prefix_len, suffix_len = prefix_len or fallback[0], suffix_len or fallback[1]
    else:
        prefix_len = suffix_len = 0
    parts = len(outer_parts(StepSettings(perturb_anchors=outer.perturb_anchors)))
    packed = (packed or (parts * outer.batch_size, seq)) if outer.pack else (0, 0)
    return RunShapes(num_inner_batches=-(-samples // inner.batch_size), inner_rows=rows,
                     outer_rows=outer.batch_size, seq_len=seq, answer_len=answer,
                     perturb_length=n, layers=layers, shared_prompt=shared,
                     inner_seq_len=int(inner_seq_len), prefix_len=int(prefix_len), suffix_len=int(suffix_len),
                     packed=tuple(packed), outer_parts=parts)


def _tree_bytes(abstract: Any, specs: Any, sizes: Mapping[str, int]) -> int:
    leaves = jax.tree.leaves(abstract)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    return sum(sh.spec_bytes(x.shape, x.dtype, s, sizes) for x, s in zip(leaves, spec_leaves, strict=True))


def _batch_struct(rows: int, shapes: RunShapes, lead: tuple[int, ...] = (),
                  inner: bool = False) -> RowBatch | SharedPromptBatch | PrefixSplitBatch:
    """ShapeDtypeStructs of one batch as builders.make_batch (or, inner, make_shared_prompt_batch and
    with_prompt_prefix) builds it."""
    s, n = (shapes.inner_seq_len if inner else shapes.seq_len), shapes.perturb_length

    def struct(*shape: int, dtype: Any = jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((*lead, rows, *shape), dtype)

    if inner and shapes.shared_prompt:
        shared = SharedPromptBatch(
            input_ids=struct(s), attention_mask=struct(s), positions=struct(s), branches=struct(s),
            perturb_positions=struct(n), prompt_lengths=struct(), answer_index=struct(2, shapes.answer_len),
            answer_targets=struct(2, shapes.answer_len), answer_mask=struct(2, shapes.answer_len, dtype=jnp.float32))
        if not shapes.prefix_len:
            return shared
        return PrefixSplitBatch(*shared, prefix_valid=struct(shapes.prefix_len),
                                suffix_slots=struct(shapes.suffix_len))
    return RowBatch(input_ids=struct(s), attention_mask=struct(s), targets=struct(s),
                    target_mask=struct(s, dtype=jnp.float32), perturb_positions=struct(n), prompt_lengths=struct())


def _packed_struct(shapes: RunShapes) -> PackedBatch:
    """ShapeDtypeStructs of a packed outer batch (packing.make_packed_batch)."""
    rows, row_len = shapes.packed
    examples = (shapes.outer_parts * shapes.outer_rows, shapes.answer_len)
    slots = jax.ShapeDtypeStruct((rows, row_len), jnp.int32)
    return PackedBatch(input_ids=slots, attention_mask=slots, positions=slots, branches=slots, perturb_index=slots,
                       answer_index=jax.ShapeDtypeStruct(examples, jnp.int32),
                       answer_targets=jax.ShapeDtypeStruct(examples, jnp.int32),
                       answer_mask=jax.ShapeDtypeStruct(examples, jnp.float32))


def _abstract_state(settings: RunSettings, model: ModelConfig, shapes: RunShapes) -> dict[str, Any]:
    """Every argument of the steps as ShapeDtypeStructs (no sharding yet)."""
    outer_opt = make_optimizer(settings.outer.optimizer, settings.outer.lr, settings.outer.weight_decay)
    inner_opt = make_optimizer(settings.inner.optimizer, settings.inner.lr)
    params = sh.abstract_param_tree(model)
    deltas = {layer: jax.ShapeDtypeStruct((shapes.perturb_length, model.hidden_size), jnp.float32)
              for layer in shapes.layers}
    masks = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32),
                         params["layers"])
    masks = {**{k: jax.ShapeDtypeStruct((), jnp.float32) for k in params if k != "layers"}, "layers": masks}
    stack = (shapes.num_inner_batches,)
    inner_batches = _batch_struct(shapes.inner_rows, shapes, stack, inner=True)
    # The round's inner cache as beear computes it (h_l, or suffix h_l + prefix K/V): shapes only.
    h_cache = jax.eval_shape(lambda p, batches: jax.lax.map(
        lambda batch: inner_cache(model, p, batch, shapes.layers[0]), batches), params, inner_batches)
    return {
        "params": params, "outer_state": jax.eval_shape(outer_opt.init, params), "masks": masks,
        "delta": deltas, "inner_state": jax.eval_shape(inner_opt.init, deltas),
        "h_cache": h_cache,
        "inner_batches": inner_batches,
        "outer_batches": ([_packed_struct(shapes), None] if shapes.packed[0] else
                          [_batch_struct(shapes.outer_rows, shapes), _batch_struct(shapes.outer_rows, shapes)]),
        "optimizers": (inner_opt, outer_opt),
    }


def array_bytes(state: Mapping[str, Any], model: ModelConfig, sizes: Mapping[str, int]) -> dict[str, int]:
    """Exact bytes per device of the persistent arrays, with the shardings `beear run` uses."""
    param_specs = sh.param_specs(model, sizes)
    state_specs = sh.follow_params(state["outer_state"], state["params"], param_specs, P())
    batch, stacked = P(sh.BATCH_AXES), P(None, sh.BATCH_AXES)

    def same(tree: Any, spec: P) -> Any:
        return jax.tree.map(lambda _: spec, tree)

    return {
        "params": _tree_bytes(state["params"], param_specs, sizes),
        "outer_state": _tree_bytes(state["outer_state"], state_specs, sizes),
        "masks": _tree_bytes(state["masks"], same(state["masks"], P()), sizes),
        "delta": _tree_bytes(state["delta"], same(state["delta"], P()), sizes),
        "inner_state": _tree_bytes(state["inner_state"], same(state["inner_state"], P()), sizes),
        "h_cache": _tree_bytes(state["h_cache"], same(state["h_cache"], stacked), sizes),
        "inner_batches": _tree_bytes(state["inner_batches"], same(state["inner_batches"], stacked), sizes),
        "outer_batches": _tree_bytes(state["outer_batches"], same(state["outer_batches"], batch), sizes),
    }


def analytical_temps(model: ModelConfig, shapes: RunShapes, sizes: Mapping[str, int], params_bytes: int,
                     settings: StepSettings) -> dict[str, int]:
    """A rough estimate of each step's temporaries per device (activations kept for the backward
    pass, float32 logits at answer positions, gradients and updates of the params)."""
    c = jnp.dtype(model.dtype).itemsize
    t, ways = sizes["tensor"], sh.batch_parallelism(sizes)
    d, f, hd = model.hidden_size, model.intermediate_size, model.head_dim
    h, k = model.num_heads, model.num_kv_heads

    def per_token_layer(s: int) -> float:
        # Kept per token and block: residuals and norms (6 D), q/k/v/attention output, the SwiGLU branch
        # (5 F), and the attention scores: float32 scores, masked scores and exponentials plus the probs.
        return c * (6 * d + (2 * h + 2 * k) * hd / t + 5 * f / t) + (12 + c) * h * s / t

    def kept(rows: int, layers: int, remat: str, s: int) -> float:
        full = remat == "full"
        saved = 1 if full else layers  # remat keeps block inputs only, recomputes one block
        block_inputs = layers * c * d if full else 0
        return rows / ways * s * (saved * per_token_layer(s) + block_inputs)

    def logits(rows: int) -> float:
        return 3 * 4 * rows / ways * shapes.answer_len * model.vocab_size / t

    cast = params_bytes * c / 4 if c < 4 else 0  # compute-dtype copy of the weights
    upper = model.num_layers - shapes.layers[0]
    passes = len(outer_parts(settings))
    si, so = shapes.inner_seq_len, shapes.seq_len
    answer_rows = shapes.inner_rows * (2 if shapes.shared_prompt else 1)  # rows of answer logits
    # With a prefix cache the inner steps run the suffix rows (their scores also span the prefix).
    steps_len = shapes.suffix_len or si
    if shapes.packed[0]:  # one packed batch of all parts
        rows, row_len = shapes.packed
        outer_activations = (kept(rows, model.num_layers, settings.outer_step_remat, row_len)
                             + logits(passes * shapes.outer_rows))
    else:
        outer_activations = passes * (kept(shapes.outer_rows, model.num_layers, settings.outer_step_remat, so)
                                      + logits(shapes.outer_rows))
    return {
        "lower_stack": int(shapes.inner_rows / ways * si * per_token_layer(si) + cast),
        "inner_epoch": int(kept(shapes.inner_rows, upper, settings.remat, steps_len) + logits(answer_rows) + cast),
        "outer_step": int(outer_activations + 4 * params_bytes + cast),  # grads, masked grads, updates, masked
    }


def compiled_temps(model: ModelConfig, state: Mapping[str, Any], mesh: jax.sharding.Mesh,
                   settings: StepSettings) -> dict[str, int] | None:
    """XLA's temp bytes per device of each compiled step (lowered on abstract sharded arguments)."""
    inner_opt, outer_opt = state["optimizers"]
    layout = sh.step_shardings(model, mesh, outer_opt)
    steps = make_steps(model, settings, min(state["delta"]), inner_opt, outer_opt, layout)

    def on(tree: Any, sharding: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)

    def everywhere(tree: Any, sharding: Any) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

    params = on(state["params"], layout.params)
    pert = Perturbation(everywhere(state["delta"], layout.replicated), next(iter(state["delta"].values())).shape[0])
    inner_state = everywhere(state["inner_state"], layout.replicated)
    stacked = everywhere(state["inner_batches"], layout.stacked_batch)
    h_cache = everywhere(state["h_cache"], layout.stacked_batch)
    safe, anchor = (everywhere(b, layout.batch) for b in state["outer_batches"])
    calls = {
        "lower_stack": (steps.lower_stack, (params, stacked)),
        "inner_epoch": (steps.inner_epoch, (params, pert, inner_state, h_cache, stacked,
                                            jax.ShapeDtypeStruct((), jnp.float32, sharding=layout.replicated))),
        "outer_step": (steps.outer_step, (everywhere(state["masks"], layout.replicated), params,
                                          on(state["outer_state"], layout.outer_state), pert, safe, anchor,
                                          *((params,) if settings.kl_weight > 0 else ()))),
    }
    temps = {}
    for name, (fn, args) in calls.items():
        stats = fn.lower(*args).compile().memory_analysis()
        if stats is None:
            return None
        temps[name] = int(stats.temp_size_in_bytes)
    return temps


def plan_run(cfg: ml_collections.ConfigDict | RunSettings, model: ModelConfig, mesh_shape: Sequence[int],
             devices: int | None = None, seq_len: int | None = None, answer_len: int | None = None,
             compile_steps: bool = True, inner_seq_len: int | None = None, prefix_len: int | None = None,
             suffix_len: int | None = None, packed: tuple[int, int] | None = None) -> Plan:
    """The memory plan of `beear run` with cfg (a config or its settings) on a mesh of mesh_shape (nothing is
    allocated)."""
    run = settings_from_config(cfg)
    check_perturb_layers(run.perturb, model.num_layers)
    resolved = sh.resolve_mesh_shape(mesh_shape, devices or jax.device_count(),
                                     "given by --devices" if devices else "visible (plan for more with --devices N)")
    sizes = sh.axis_sizes(resolved)
    shapes = run_shapes(run, seq_len, answer_len, inner_seq_len, prefix_len, suffix_len, packed)
    sh.check_batch_size(inner_rows(run.inner)[0], shapes.inner_rows, sizes)
    sh.check_batch_size("outer.batch_size", shapes.outer_rows, sizes)
    settings = step_settings(run, shapes.answer_len)
    state = _abstract_state(run, model, shapes)
    arrays = array_bytes(state, model, sizes)
    if settings.kl_weight > 0:  # outer.kl_weight keeps the frozen start model beside the params
        arrays = {"params": arrays["params"], "reference": arrays["params"],
                  **{k: v for k, v in arrays.items() if k != "params"}}
    estimate = analytical_temps(model, shapes, sizes, arrays["params"], settings)
    temps, source = None, "analytical estimate"
    if compile_steps and math.prod(resolved) <= jax.device_count():
        temps = compiled_temps(model, state, sh.make_mesh(resolved), settings)
        source = f"XLA memory analysis ({jax.devices()[0].platform})"
    return Plan(model, resolved, shapes, arrays, temps or estimate, source if temps else "analytical estimate",
                estimate)


# ---- output ------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def format_plan(plan: Plan, device_memory_gb: float | None = None) -> str:
    """A text table of bytes per device, the phase peaks, and whether the peak fits."""
    s = plan.shapes
    header = (f"model: {plan.model.num_layers} layers, hidden {plan.model.hidden_size}, {plan.model.dtype} compute; "
              f"mesh (data, fsdp, tensor) = {plan.mesh}")
    inner = (f"{s.inner_rows} rows of a prompt and both answers ({s.inner_seq_len} tokens)" if s.shared_prompt
             else f"{s.inner_rows} rows")
    if s.prefix_len:
        inner += f", the inner steps run the last {s.suffix_len} after a cached prefix of {s.prefix_len}"
    outer = (f"outer {s.outer_parts} x {s.outer_rows} examples packed in {s.packed[0]} rows of {s.packed[1]}"
             if s.packed[0] else f"outer {s.outer_rows} rows")
    batches = (f"shapes: {s.num_inner_batches} inner batches x {inner}, {outer}, "
               f"seq {s.seq_len}, answers {s.answer_len}, delta {s.perturb_length} x {plan.model.hidden_size} at "
               f"layer(s) {', '.join(map(str, s.layers))}")
    lines = [header, batches, "", "bytes per device:"]
    names = {"params": "params (float32)", "reference": "start model (outer.kl_weight)",
             "outer_state": "outer optimizer state", "masks": "trainable masks",
             "delta": "delta", "inner_state": "delta optimizer state",
             "h_cache": "cached h_l + prefix K/V" if s.prefix_len else "cached activations h_l",
             "inner_batches": "inner batches", "outer_batches": "outer batches"}
    lines += [f"  {names[k]:<28}{_gb(v):>12}" for k, v in plan.arrays.items()]
    lines += [f"  temporaries {k:<16}{_gb(v):>12}" for k, v in plan.temps.items()]
    lines += [f"  (temporaries: {plan.temps_source})", "",
              f"peak, inner phase: {_gb(plan.phases['inner'])}; outer phase: {_gb(plan.phases['outer'])}"]
    if device_memory_gb:
        fits = plan.peak <= device_memory_gb * GB
        lines.append(f"{'fits' if fits else 'does NOT fit'} in {device_memory_gb:g} GB per device "
                     f"(peak {plan.peak / (device_memory_gb * GB):.0%} of it)")
    return "\n".join(lines)
