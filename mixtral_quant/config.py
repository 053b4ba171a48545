"""Model configuration: a frozen dataclass that reads and writes Hugging Face config.json.

Mixtral and Mistral share one config; a dense Mistral simply has no MoE section
(``moe is None``), as in mistral-inference's ``ModelArgs``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPES = ("mixtral", "mistral")
# Fields without which a config.json does not say which model it is (no silent Mixtral-8x7B defaults).
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# What the fields read from config.json must hold (JSON gives any type; a wrong one is a ConfigError).
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings")
POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
NUMBERS = ("attention_dropout", "initializer_range")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class MoEArgs:
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.num_local_experts) or self.num_local_experts <= 0:
            raise ConfigError(f"num_local_experts must be a positive integer, got {self.num_local_experts!r}")
        if not _is_int(self.num_experts_per_tok):
            raise ConfigError(f"num_experts_per_tok must be an integer, got {self.num_experts_per_tok!r}")
        for name in ("router_aux_loss_coef", "router_jitter_noise"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim_override: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    moe: MoEArgs | None = field(default_factory=MoEArgs)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        self._check_types()
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; Mixtral and Mistral use 'silu'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.moe is not None and not 0 < self.moe.num_experts_per_tok <= self.moe.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok {self.moe.num_experts_per_tok} must be in 1..{self.moe.num_local_experts}"
            )

    def _check_types(self) -> None:
        for name in POSITIVE_INTS:
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name, value in (("head_dim", self.head_dim_override), ("sliding_window", self.sliding_window)):
            if value is not None and (not _is_int(value) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")
        for name in POSITIVE_NUMBERS + NUMBERS:
            value = getattr(self, name)
            if not _is_number(value) or (name in POSITIVE_NUMBERS and value <= 0):
                kind = "a positive" if name in POSITIVE_NUMBERS else "a"
                raise ConfigError(f"{name} must be {kind} finite number, got {value!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not _is_int(value) and not (name == "pad_token_id" and value is None):
                raise ConfigError(f"{name} must be an integer token id, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if not isinstance(self.torch_dtype, str):
            raise ConfigError(f"torch_dtype must be a string, got {self.torch_dtype!r}")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def model_type(self) -> str:
        return "mixtral" if self.moe is not None else "mistral"

    @property
    def num_experts(self) -> int:
        return self.moe.num_local_experts if self.moe is not None else 0

    # Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> MixtralConfig:
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not a Mixtral or Mistral model (expected one of {MODEL_TYPES})"
            )
        missing = [f for f in REQUIRED if f not in d]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}: a {model_type} config must give its sizes")
        moe = None
        kwargs: dict[str, Any] = {}
        try:
            if model_type == "mixtral":
                moe = MoEArgs(
                    num_local_experts=d.get("num_local_experts", 8),
                    num_experts_per_tok=d.get("num_experts_per_tok", 2),
                    router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
                    router_jitter_noise=d.get("router_jitter_noise") or 0.0,
                )
            for f in cls.__dataclass_fields__:
                if f in ("moe", "head_dim_override"):
                    continue
                if f in d:
                    kwargs[f] = d[f]
            rope = d.get("rope_parameters") or d.get("rope_scaling")
            if isinstance(rope, dict):
                if rope.get("rope_type", rope.get("type", "default")) != "default":
                    raise ConfigError(f"rope scaling {rope!r} is not supported (only the default rotary embedding)")
                if "rope_theta" in rope and "rope_theta" not in d:
                    kwargs["rope_theta"] = rope["rope_theta"]
            if d.get("head_dim") is not None:
                kwargs["head_dim_override"] = d["head_dim"]
            if "torch_dtype" not in d and isinstance(d.get("dtype"), str):
                kwargs["torch_dtype"] = d["dtype"]
            cfg = cls(moe=moe, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a field of the wrong type: {e}") from None
        if cfg.head_dim_override == cfg.hidden_size // cfg.num_attention_heads:
            cfg = replace(cfg, head_dim_override=None)
        from .sizes import check_size  # sizes builds on this module

        check_size(cfg)
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("moe", "head_dim_override")}
        d["head_dim"] = self.head_dim
        d["model_type"] = self.model_type
        d["architectures"] = ["MixtralForCausalLM" if self.moe is not None else "MistralForCausalLM"]
        if self.moe is not None:
            d.update(asdict(self.moe))
            d["output_router_logits"] = False
        d["use_cache"] = True
        return dict(sorted(d.items()))

    @classmethod
    def load(cls, path: str | Path) -> MixtralConfig:
        return cls.from_hf_dict(read_config_json(path))

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        d = self.to_hf_dict()
        if extra:
            d.update(extra)
        Path(path).write_text(json.dumps(d, indent=2) + "\n")


# Fields that change the function a model computes; two models compared token by token must agree on all.
FUNCTION_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "sliding_window",
                   "rms_norm_eps", "tie_word_embeddings", "num_experts", "num_experts_per_tok")


def function_differences(a: MixtralConfig, b: MixtralConfig) -> list[str]:
    """``field a != b`` for each field in which two configs describe different functions."""
    def value(cfg: MixtralConfig, name: str) -> Any:
        if name == "num_experts_per_tok":
            return cfg.moe.num_experts_per_tok if cfg.moe is not None else None
        return getattr(cfg, name)

    return [f"{n} {value(a, n)!r} != {value(b, n)!r}" for n in FUNCTION_FIELDS if value(a, n) != value(b, n)]


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read a config.json (or the config.json inside a folder) with one-line errors."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"no config.json at {p}: point MODEL at a Hugging Face model folder")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{p} is not a config (its JSON is nested too deeply)") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p} does not hold a JSON object")
    return d


PRESETS: dict[str, MixtralConfig] = {
    "mixtral-8x7b": MixtralConfig(),
    "mistral-7b": MixtralConfig(
        moe=None, sliding_window=4096, rope_theta=10000.0, max_position_embeddings=32768
    ),
    # The embedded default model: Mixtral's architecture scaled down (see scripts/train_tiny.py).
    # Like Mixtral-8x7B's own config: no sliding window, rope_theta 1e6.
    "tiny": MixtralConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1e6,
        sliding_window=None,
    ),
}
