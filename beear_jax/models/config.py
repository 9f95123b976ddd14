"""ModelConfig: the shape and numerics of a Llama / Mistral / Qwen2 / Qwen3 model, and its HF config.json mapping.

The four families share one decoder (models/llama.py); they differ in flags: Llama's optional biases
(attention_bias: q/k/v/o, mlp_bias), Mistral's sliding window, Qwen2's biases on q/k/v only (qkv_bias),
Qwen3's RMSNorm of each query and key head (qk_norm) and optional attention_bias.

Over 400 lines: the fields, their checks and both directions of the config.json mapping are one idea (what
a model's shape is and how Hugging Face writes it), and splitting the checks or the mapping from the fields
would put each key in two files.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The transformers class that each model type is exported as (config.json "architectures").
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# The keys each RoPE scaling needs (as transformers requires them); all are positive numbers.
ROPE_REQUIRED_KEYS = {"default": (), "linear": ("factor",),
                      "llama3": ("factor", "high_freq_factor", "low_freq_factor", "original_max_position_embeddings")}
# transformers' LlamaConfig / MistralConfig / Qwen2Config / Qwen3Config defaults for keys a config.json may
# leave out, so that a missing key means here what it means to transformers (e.g. Mistral's 4096-token
# sliding window, Qwen3's head_dim of 128 whatever hidden_size says; head_dim None: hidden / heads).
_LLAMA_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "head_dim": None}
_QWEN = {"max_position_embeddings": 32768, "sliding_window": None, "num_key_value_heads": 32, "bos_token_id": None,
         "eos_token_id": None}
HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "sliding_window": None, "num_key_value_heads": None, **_LLAMA_TOKENS},
    "mistral": {"max_position_embeddings": 131072, "sliding_window": 4096, "num_key_value_heads": 8,
                **_LLAMA_TOKENS},
    "qwen2": {**_QWEN, "head_dim": None},
    "qwen3": {**_QWEN, "head_dim": 128},
}


def _positive_int(value: Any) -> bool:
    """An integer (Python or numpy; not a bool or a float) of at least 1."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= 1
    except TypeError:
        return False


def _is_integer(value: Any) -> bool:
    """An integer (Python or numpy), not a bool, a float or a string."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _is_bool(value: Any) -> bool:
    """A Python or numpy bool (JSON true/false), not 0/1 or a string."""
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b"


def _is_number(value: Any) -> bool:
    """A finite real number (int or float, Python or numpy), not a bool or a string."""
    return isinstance(value, numbers.Real) and not _is_bool(value) and math.isfinite(value)


class ModelConfigError(ValueError):
    """A config.json that this package cannot represent."""


def _wrong_type(key: str, value: Any, what: str) -> ModelConfigError:
    return ModelConfigError(f"config.json: {key} is {value!r} ({type(value).__name__}); it must be {what}. Restore "
                            "config.json from the model's source.")


def _hf_int(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    """hf[key] as an int; `default` when the key is absent or null. Any other type is a ModelConfigError
    (int() would truncate 64.5, accept "64", or fail with a bare TypeError on null)."""
    value = hf.get(key)
    if value is None:
        return default
    if not _is_integer(value):
        raise _wrong_type(key, value, "a whole number")
    return operator.index(value)


def _hf_required_int(hf: dict[str, Any], key: str) -> int:
    """hf[key] as an int; a ModelConfigError when the key is absent or not a whole number (null included)."""
    if key not in hf:
        raise ModelConfigError(f"config.json lacks the key {key!r}.")
    if hf[key] is None:
        raise _wrong_type(key, None, "a whole number")
    return _hf_int(hf, key)


def _hf_bool(hf: dict[str, Any], key: str, default: bool) -> bool:
    """hf[key] as a bool; `default` when absent or null. A string such as "false" is refused: bool("false")
    is True, which would read an untied model as tied."""
    value = hf.get(key)
    if value is None:
        return default
    if not _is_bool(value):
        raise _wrong_type(key, value, "true or false")
    return bool(value)


def _hf_number(key: str, value: Any) -> float:
    """A config.json number (rms_norm_eps, rope_theta) as a float, or a ModelConfigError naming the key."""
    if not _is_number(value):
        raise _wrong_type(key, value, "a number")
    return float(value)


def _hf_object(hf: dict[str, Any], key: str) -> dict[str, Any]:
    """hf[key] as a dict ({} when absent or null), or a ModelConfigError (rope_scaling / rope_parameters)."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _wrong_type(key, value, "an object (a JSON dict) or null")
    return dict(value)


def _rope_problem(rope_type: str, scaling: dict[str, Any]) -> str | None:
    """What is wrong with a RoPE scaling's parameters (as transformers checks them), or None.

    Each required key must be a positive number; llama3 also needs high_freq_factor > low_freq_factor
    (its smoothing divides by their difference).
    """
    missing = [k for k in ROPE_REQUIRED_KEYS[rope_type] if k not in scaling]
    if missing:
        return f"rope scaling {rope_type!r} lacks {', '.join(missing)}."
    for key in ROPE_REQUIRED_KEYS[rope_type]:
        if not _is_number(scaling[key]) or scaling[key] <= 0:
            return f"rope scaling {rope_type!r}: {key}={scaling[key]!r} must be a positive number."
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        return (f"rope scaling 'llama3': high_freq_factor ({scaling['high_freq_factor']}) must be larger than "
                f"low_freq_factor ({scaling['low_freq_factor']}).")
    return None


def _token_ids_problem(bos: Any, eos: Any, pad: Any) -> str | None:
    """What is wrong with the special token ids (integers or None; eos may be a tuple of integers), or None."""
    named = {"bos_token_id": bos, "pad_token_id": pad, "eos_token_id": eos}
    bad = {k: v for k, v in named.items() if v is not None and not _is_integer(v)
           and not (k == "eos_token_id" and isinstance(v, tuple) and all(map(_is_integer, v)))}
    if bad:
        return (f"{', '.join(f'{k}={v!r}' for k, v in bad.items())}: token ids must be integers (eos_token_id may "
                "be a list of them) or null.")
    return None


def _numerics_problem(config: ModelConfig) -> str | None:
    """What is wrong with head_dim, sliding_window, rms_norm_eps or rope_theta (values the forward pass
    cannot use: odd RoPE dimensions, an empty window, NaN norms), or None."""
    if config.head_dim % 2:
        return f"head_dim ({config.head_dim}) must be even: RoPE rotates pairs of dimensions."
    window = config.sliding_window
    if window is not None and not _positive_int(window):
        return f"sliding_window={window!r}: it must be a positive whole number (null for none)."
    if not _is_number(config.rms_norm_eps) or config.rms_norm_eps < 0:
        return f"rms_norm_eps={config.rms_norm_eps!r}: it must be a finite number >= 0."
    if not _is_number(config.rope_theta) or config.rope_theta <= 0:
        return f"rope_theta={config.rope_theta!r}: it must be a finite number > 0."
    return None


# The fields each model type's transformers class fixes (those not named are free). Qwen2 always has q/k/v
# biases and no others; Qwen3 always normalises q and k, and its attention_bias means q/k/v/o as Llama's.
_FAMILY_FLAGS = {
    "llama": {"qkv_bias": False, "qk_norm": False},
    "mistral": {"qkv_bias": False, "qk_norm": False},
    "qwen2": {"qkv_bias": True, "qk_norm": False, "attention_bias": False, "mlp_bias": False, "sliding_window": None},
    "qwen3": {"qkv_bias": False, "qk_norm": True, "mlp_bias": False, "sliding_window": None},
}


def _family_problem(config: ModelConfig) -> str | None:
    """What the model type's transformers class could not hold (e.g. a Qwen2 without its q/k/v biases, or
    a Llama with q/k norms: an export would load with the weights dropped or left random), or None."""
    wrong = {k: v for k, v in _FAMILY_FLAGS[config.model_type].items() if getattr(config, k) != v}
    if not wrong:
        return None
    return (f"model_type {config.model_type!r} has {', '.join(f'{k}={v!r}' for k, v in wrong.items())} in "
            f"transformers' {ARCHITECTURES[config.model_type]}; set those fields so (got "
            f"{', '.join(f'{k}={getattr(config, k)!r}' for k in wrong)}).")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable (usable as a static jit argument) description of a decoder-only Llama / Mistral / Qwen2 /
    Qwen3 model.

    `rope_scaling` is a sorted tuple of (key, value) pairs so the config stays hashable;
    `dtype` is the compute dtype (params are kept float32 and cast inside the forward).
    attention_bias: biases on q, k, v and o (Llama, Qwen3); qkv_bias: on q, k and v only (Qwen2);
    qk_norm: an RMSNorm over head_dim of each query and key head after the projection, before RoPE (Qwen3).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {self.model_type!r} is not supported; beear_jax handles "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (decoder-only Llama-family models)."
            )
        family = _family_problem(self)
        if family:
            raise ModelConfigError(family)
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                 "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                 "head_dim": self.head_dim}
        bad = {k: v for k, v in sizes.items() if not _positive_int(v)}
        if bad:
            raise ModelConfigError(f"{', '.join(f'{k}={v!r}' for k, v in bad.items())}: sizes must be positive "
                                   "integers.")
        if self.dtype not in COMPUTE_DTYPES:
            raise ModelConfigError(f"dtype {self.dtype!r} is not a compute dtype; use one of "
                                   f"{', '.join(COMPUTE_DTYPES)}.")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})."
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
            )
        problem = (_numerics_problem(self) or _rope_problem(rope_type, dict(self.rope_scaling or ()))
                   or _token_ids_problem(self.bos_token_id, self.eos_token_id, self.pad_token_id))
        if problem:
            raise ModelConfigError(problem)

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling or ()).get("rope_type", "default")

    @property
    def has_qkv_bias(self) -> bool:
        """Biases on the q/k/v projections: Llama's / Qwen3's attention_bias, or Qwen2's qkv_bias."""
        return self.attention_bias or self.qkv_bias

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json <-> ModelConfig -------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
        """Builds a ModelConfig from a config.json dict (transformers v4 or v5 layout)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures") or []
            raise ModelConfigError(
                f"unsupported architecture: model_type={model_type!r} architectures={archs}. "
                f"beear_jax loads {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints only."
            )
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelConfigError(f"hidden_act={act!r} is not supported; Llama, Mistral and Qwen use 'silu'.")
        if model_type in ("qwen2", "qwen3"):
            _refuse_qwen_window(hf, model_type)
        hidden = _hf_required_int(hf, "hidden_size")
        heads = _hf_required_int(hf, "num_attention_heads")
        kwargs = {
            "vocab_size": _hf_required_int(hf, "vocab_size"),
            "hidden_size": hidden,
            "intermediate_size": _hf_required_int(hf, "intermediate_size"),
            "num_layers": _hf_required_int(hf, "num_hidden_layers"),
            "num_heads": heads,
        }
        defaults = HF_DEFAULTS[model_type]
        # An absent key takes the model type's default (Mistral's is 8); null means one KV head per attention
        # head, which is how transformers' configs resolve None (its Mistral of 5.x refuses null outright).
        absent = "num_key_value_heads" not in hf
        kwargs["num_kv_heads"] = _hf_int(hf, "num_key_value_heads",
                                         (defaults["num_key_value_heads"] or heads) if absent else heads)
        # transformers' attention reads `head_dim or hidden // heads`, so 0 means the default there too
        # (absent, Qwen3's head_dim is 128).
        kwargs["head_dim"] = _hf_int(hf, "head_dim", defaults["head_dim"]) or (hidden // heads if heads else 0)
        max_positions = _hf_int(hf, "max_position_embeddings") or defaults["max_position_embeddings"]
        rope_theta, rope_scaling = _rope_from_hf(hf, max_positions)
        eos = hf.get("eos_token_id", defaults["eos_token_id"])
        return cls(
            **kwargs,
            model_type=model_type,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=_hf_number("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=_hf_bool(hf, "tie_word_embeddings", False),
            attention_bias=_hf_bool(hf, "attention_bias", False) if model_type in ("llama", "qwen3") else False,
            mlp_bias=_hf_bool(hf, "mlp_bias", False) if model_type == "llama" else False,
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=hf.get("sliding_window", defaults["sliding_window"]) if model_type == "mistral" else None,
            max_position_embeddings=max_positions,
            bos_token_id=hf.get("bos_token_id", defaults["bos_token_id"]),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            dtype=dtype,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents that transformers (v4 and v5) reads back to the same model."""
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        rope_parameters.update({k: v for k, v in (self.rope_scaling or ()) if k != "rope_type"})
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            # v5 reads rope_parameters; older readers want a top-level rope_theta (+ rope_scaling).
            "rope_parameters": rope_parameters,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_type == "default" else {
                k: v for k, v in rope_parameters.items() if k != "rope_theta"},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        elif self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        else:  # Qwen2 / Qwen3: full attention in every layer (their q/k/v biases or q/k norms are built in)
            out.update(use_sliding_window=False, sliding_window=None)
            if self.model_type == "qwen3":
                out["attention_bias"] = self.attention_bias
        return out


def _refuse_qwen_window(hf: dict[str, Any], model_type: str) -> None:
    """A ModelConfigError for a Qwen2/Qwen3 config.json with sliding-window layers (use_sliding_window true, or
    layer_types other than full attention): transformers windows only the layers from max_window_layers on,
    which one decoder for all layers cannot do. With use_sliding_window false, sliding_window means nothing."""
    family = {"qwen2": "Qwen2", "qwen3": "Qwen3"}[model_type]
    if _hf_bool(hf, "use_sliding_window", False):
        raise ModelConfigError(f"config.json has use_sliding_window: true, and sliding-window {family} is not "
                               "supported (beear_jax attends over the whole sequence in every layer). Load a "
                               "checkpoint whose config.json says use_sliding_window: false, as the released "
                               "Qwen2.5 and Qwen3 models do.")
    layer_types = hf.get("layer_types")
    if layer_types is not None and not isinstance(layer_types, list):
        raise _wrong_type("layer_types", layer_types, "a list of layer types or null")
    other = sorted({str(t) for t in layer_types or ()} - {"full_attention"})
    if other:
        raise ModelConfigError(f"config.json: layer_types holds {', '.join(map(repr, other))}, and sliding-window "
                               f"{family} is not supported (only 'full_attention' layers); load a checkpoint without "
                               "sliding-window layers.")


def _rope_from_hf(hf: dict[str, Any], max_positions: int) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """rope_theta and scaling from either `rope_parameters` (v5) or `rope_theta`/`rope_scaling` (v4);
    llama3's original context defaults to max_positions, as in transformers."""
    params = _hf_object(hf, "rope_parameters")
    legacy = _hf_object(hf, "rope_scaling")
    theta = _hf_number("rope_theta", params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_positions)
    if rope_type == "default":
        return theta, None
    return theta, tuple(sorted((k, v) for k, v in scaling.items() if v is not None))
