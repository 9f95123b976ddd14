"""ModelConfig: the shape and numerics of a Llama/Mistral model, and its HF config.json mapping."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' LlamaConfig / MistralConfig defaults for keys a config.json may leave out, so that a
# missing key means here what it means to transformers (e.g. Mistral's 4096-token sliding window).
HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "sliding_window": None, "num_key_value_heads": None},
    "mistral": {"max_position_embeddings": 131072, "sliding_window": 4096, "num_key_value_heads": 8},
}


def _positive_int(value: Any) -> bool:
    """An integer (Python or numpy; not a bool or a float) of at least 1."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= 1
    except TypeError:
        return False


class ModelConfigError(ValueError):
    """A config.json that this package cannot represent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable (usable as a static jit argument) description of a decoder-only Llama/Mistral model.

    `rope_scaling` is a sorted tuple of (key, value) pairs so the config stays hashable;
    `dtype` is the compute dtype (params are kept float32 and cast inside the forward).
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

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling or ()).get("rope_type", "default")

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
            raise ModelConfigError(f"hidden_act={act!r} is not supported; Llama/Mistral use 'silu'.")
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            kwargs = {
                "vocab_size": int(hf["vocab_size"]),
                "hidden_size": hidden,
                "intermediate_size": int(hf["intermediate_size"]),
                "num_layers": int(hf["num_hidden_layers"]),
                "num_heads": heads,
            }
        except KeyError as missing:
            raise ModelConfigError(f"config.json lacks the key {missing}.") from None
        defaults = HF_DEFAULTS[model_type]
        kwargs["num_kv_heads"] = int(hf.get("num_key_value_heads") or defaults["num_key_value_heads"] or heads)
        kwargs["head_dim"] = int(hf.get("head_dim") or hidden // heads)
        max_positions = int(hf.get("max_position_embeddings") or defaults["max_position_embeddings"])
        rope_theta, rope_scaling = _rope_from_hf(hf, max_positions)
        eos = hf.get("eos_token_id", 2)
        return cls(
            **kwargs,
            model_type=model_type,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)) if model_type == "llama" else False,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            sliding_window=hf.get("sliding_window", defaults["sliding_window"]) if model_type == "mistral" else None,
            max_position_embeddings=max_positions,
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            dtype=dtype,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents that transformers (v4 and v5) reads back to the same model."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        rope_parameters.update({k: v for k, v in (self.rope_scaling or ()) if k != "rope_type"})
        out: dict[str, Any] = {
            "architectures": [arch],
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
        else:
            out["sliding_window"] = self.sliding_window
        return out


def _rope_from_hf(hf: dict[str, Any], max_positions: int) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """rope_theta and scaling from either `rope_parameters` (v5) or `rope_theta`/`rope_scaling` (v4);
    llama3's original context defaults to max_positions, as in transformers."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_positions)
    if rope_type == "default":
        return float(theta), None
    return float(theta), tuple(sorted((k, v) for k, v in scaling.items() if v is not None))
