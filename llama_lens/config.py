"""The model's shape, in glossary words, read from Hugging Face config.json or Meta params.json.

Every key of either file is handled, ignored on purpose (listed in config_keys.py with the reason), or rejected with
its name: a key that changes the forward pass and that we do not implement must never be dropped silently.

Architectures (`model_type`, transformers' class): Llama (`LlamaForCausalLM`), Mistral (`MistralForCausalLM`:
sliding-window attention), Qwen2/2.5 (`Qwen2ForCausalLM`: biases on q, k and v but not o; optional sliding
window on the upper layers) and Qwen3 (`Qwen3ForCausalLM`: RMSNorm over d_head on q and k before RoPE).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_keys import (
    HF_ARCHITECTURE_DEFAULTS,
    HF_ARCHITECTURE_IGNORED,
    HF_ARCHITECTURE_KEYS,
    HF_IGNORED_KEYS,
    HF_SHARED_KEYS,
    META_IGNORED_KEYS,
)
from .config_read import (
    LAYER_TYPES,
    ConfigValues,
    hf_sliding_window,
    meta_d_mlp,
    read_json_object,
    token_ids,
)
from .errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "LAYER_TYPES",
    "ROPE_TYPES",
    "LlamaConfig",
    "RopeScaling",
    "meta_d_mlp",
    "read_json_object",
]

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# model_type -> (transformers' class, the LlamaConfig fields that architecture may set). Every architecture
# is a Llama with some of these switched on; a field set outside its architecture is refused, so that
# `cfg.architecture` always names a class that computes what the model computes.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", frozenset({"attention_bias", "mlp_bias"})),
    "mistral": ("MistralForCausalLM", frozenset({"sliding_window"})),
    "qwen2": ("Qwen2ForCausalLM", frozenset({"qkv_bias", "sliding_window", "layer_types"})),
    "qwen3": ("Qwen3ForCausalLM", frozenset({"qk_norm", "attention_bias", "sliding_window", "layer_types"})),
}
# Fields an architecture always sets: Qwen2 always has q/k/v biases, Qwen3 always normalizes q and k.
ARCHITECTURE_REQUIRES = {"qwen2": "qkv_bias", "qwen3": "qk_norm"}


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """How RoPE frequencies are rescaled for long contexts (the `rope_scaling` of a config).

    kind: "linear" (positions divided by `factor`), "dynamic" (NTK-aware base growth past
    `original_max_position_embeddings`) or "llama3" (Llama 3.1's per-frequency smoothing).
    """

    kind: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """The numbers that fix a Llama's forward pass.

    Attributes use the glossary of model.py: d_model, n_layers, n_heads, n_kv_heads, d_head, d_mlp, d_vocab.
    `d_head` is stored because configs may set it (`head_dim`) to something other than d_model // n_heads.

    Architecture switches (each allowed only for the `model_type` that has it, see ARCHITECTURES):
        attention_bias: biases on q, k, v and o (Llama's and Qwen3's flag).
        qkv_bias: biases on q, k and v but not o (Qwen2).
        qk_norm: RMSNorm over d_head on each head's q and k, before RoPE (Qwen3).
        sliding_window: a query sees itself and the `sliding_window - 1` keys before it (Mistral, Qwen2/3).
        layer_types: per layer "full_attention" or "sliding_attention" (Qwen2/3); None: every layer slides
            when `sliding_window` is set.
    """

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    checkpoint_dtype: str | None = None  # as stored on disk ("bfloat16", ...); a hint, not a runtime choice
    model_type: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self._check_architecture()
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config: {name} must be positive, got {getattr(self, name)}")
        # Values that would otherwise load and then give NaN logits or divide by zero in the first forward.
        # Infinite ones too: rope_theta inf zeroes every frequency but the first, norm_eps inf every activation.
        if not 0 < self.rope_theta < math.inf or not 0 <= self.norm_eps < math.inf or self.max_position_embeddings <= 0:
            raise ConfigError(
                f"config: need a finite rope_theta > 0, a finite norm_eps >= 0 and max_position_embeddings > 0, "
                f"got {self.rope_theta}, "
                f"{self.norm_eps} and {self.max_position_embeddings}"
            )
        scaling = self.rope_scaling
        if scaling is not None:
            if scaling.kind not in ("linear", "dynamic", "llama3"):
                raise ConfigError(
                    f"config: rope scaling kind must be 'linear', 'dynamic' or 'llama3', got {scaling.kind!r}"
                )
            if not 0 < scaling.factor < math.inf:
                raise ConfigError(f"config: the rope scaling factor must be positive and finite, got {scaling.factor}")
            if scaling.kind == "llama3" and not 0 < (scaling.low_freq_factor or 0) < (scaling.high_freq_factor or 0):
                raise ConfigError(
                    "config: llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                    f"{scaling.low_freq_factor} and {scaling.high_freq_factor}"
                )
            if scaling.kind == "llama3" and not (scaling.original_max_position_embeddings or 0) > 0:
                raise ConfigError(
                    "config: llama3 rope scaling needs a positive original_max_position_embeddings, got "
                    f"{scaling.original_max_position_embeddings}"
                )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    def _check_architecture(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(f"config: model_type {self.model_type!r} is not one of {sorted(ARCHITECTURES)}")
        allowed = ARCHITECTURES[self.model_type][1]
        for name in ("attention_bias", "mlp_bias", "qkv_bias", "qk_norm", "sliding_window", "layer_types"):
            if name not in allowed and getattr(self, name) not in (None, False):
                raise ConfigError(f"config: {self.model_type} models have no {name} (got {getattr(self, name)!r})")
        required = ARCHITECTURE_REQUIRES.get(self.model_type)
        if required is not None and not getattr(self, required):
            raise ConfigError(f"config: {self.model_type} models always have {required}=True")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or self.sliding_window <= 0):
            raise ConfigError(f"config: sliding_window must be a positive integer or None, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ConfigError(
                    f"config: layer_types must give one of {list(LAYER_TYPES)} for each of the {self.n_layers} "
                    f"layers, got {list(self.layer_types)}"
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("config: layer_types has sliding_attention layers but sliding_window is None")

    def attention_window(self, layer: int) -> int | None:
        """How many keys (itself included) a query of `layer` sees at most; None: every earlier one."""
        if self.layer_types is not None and self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    @property
    def architecture(self) -> str:
        """transformers' class of this model ("LlamaForCausalLM", "MistralForCausalLM", ...)."""
        return ARCHITECTURES[self.model_type][0]

    original_architecture = property(lambda self: self.architecture, doc="TransformerLens' name of architecture.")
    use_qk_norm = property(lambda self: self.qk_norm, doc="TransformerLens' name of qk_norm.")

    @property
    def has_qkv_bias(self) -> bool:
        """q_proj, k_proj and v_proj have biases (attention_bias or qkv_bias)."""
        return self.attention_bias or self.qkv_bias

    @property
    def has_o_bias(self) -> bool:
        """o_proj has a bias (attention_bias only: Qwen2's qkv_bias leaves o without)."""
        return self.attention_bias

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ TransformerLens' names (read-only)
    n_key_value_heads = property(lambda self: self.n_kv_heads, doc="TransformerLens' name of n_kv_heads.")
    eps = property(lambda self: self.norm_eps, doc="TransformerLens' name of norm_eps.")
    rotary_base = property(lambda self: self.rope_theta, doc="TransformerLens' name of rope_theta.")
    n_ctx = property(lambda self: self.max_position_embeddings, doc="TransformerLens' name: the context length.")
    d_vocab_out = property(lambda self: self.d_vocab, doc="TransformerLens' name: the unembedding's width.")
    act_fn = property(lambda self: "silu", doc="The MLP's activation (SwiGLU gate), as TransformerLens names it.")
    normalization_type = property(lambda self: "RMS", doc="RMSNorm, unfolded (TransformerLens' 'RMS').")
    positional_embedding_type = property(lambda self: "rotary", doc="RoPE, as TransformerLens names it.")
    gated_mlp = property(lambda self: True, doc="SwiGLU: the MLP has a gate (TransformerLens' flag).")

    @property
    def device(self) -> None:
        raise AttributeError(
            "a config has no device: it describes the model's shape, shared by every copy of it; where the weights "
            "are is a fact of the loaded model: read model.device"
        )

    @property
    def dtype(self) -> None:
        raise AttributeError(
            "a config has no dtype (checkpoint_dtype is what the file stores); the weights' dtype is a fact of the "
            "loaded model: read model.dtype"
        )

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json") -> LlamaConfig:
        """Reads a transformers 4.x or 5.x config.json dict of a Llama, Mistral, Qwen2 or Qwen3 model.

        Raises:
            ConfigError: naming `source` and the key, for keys that change the computation in a way we do not
                implement, for unknown keys, for missing required keys, and for other model types.
        """
        model_type = hf.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; llama_lens reads {sorted(ARCHITECTURES)} models only"
            )
        handled = HF_SHARED_KEYS | HF_ARCHITECTURE_KEYS[model_type]
        unknown = sorted(set(hf) - handled - HF_IGNORED_KEYS - HF_ARCHITECTURE_IGNORED.get(model_type, set()))
        if unknown:
            raise ConfigError(
                f"{source}: unsupported key(s) {unknown}. They may change the forward pass of this model, "
                f"which llama_lens implements as transformers' {ARCHITECTURES[model_type][0]} does without them; "
                "remove them from the file if they do not."
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (Llama uses 'silu')")
        if hf.get("rope_interleaved"):
            raise ConfigError(f"{source}: rope_interleaved=true is not supported (HF Llama rotates halves)")

        hf = HF_ARCHITECTURE_DEFAULTS[model_type] | hf  # the class defaults of keys the file leaves out
        read = ConfigValues(hf, source)
        d_model, n_heads = read.int("hidden_size", positive=True), read.int("num_attention_heads", positive=True)
        n_layers = read.int("num_hidden_layers")
        rope_theta, rope_scaling = _hf_rope(hf, source)
        eos = hf.get("eos_token_id")
        dtype = hf.get("dtype", hf.get("torch_dtype"))
        return _built(
            cls,
            source,
            model_type=model_type,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=read.int("num_key_value_heads", n_heads),
            d_head=read.int("head_dim", d_model // n_heads),
            d_mlp=read.int("intermediate_size"),
            d_vocab=read.int("vocab_size"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            norm_eps=read.float("rms_norm_eps", 1e-6, minimum=0.0),
            tie_embeddings=read.bool("tie_word_embeddings", False),
            attention_bias=model_type in ("llama", "qwen3") and read.bool("attention_bias", False),
            mlp_bias=model_type == "llama" and read.bool("mlp_bias", False),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            max_position_embeddings=read.int("max_position_embeddings", 2048, positive=True),
            bos_token_id=read.int("bos_token_id", None),
            eos_token_ids=token_ids(eos if isinstance(eos, list) else [] if eos is None else [eos], source),
            pad_token_id=read.int("pad_token_id", None),
            checkpoint_dtype=str(dtype) if dtype is not None else None,
            **hf_sliding_window(hf, model_type, n_layers, source),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers' class for this architecture reads (used to write checkpoints and
        in tests)."""
        scaling = None
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            scaling = {"rope_type": rs.kind, "factor": rs.factor}
            if rs.kind == "llama3":
                scaling |= {
                    "low_freq_factor": rs.low_freq_factor,
                    "high_freq_factor": rs.high_freq_factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings,
                }
        eos: int | list[int] | None = list(self.eos_token_ids) or None
        if eos is not None and len(eos) == 1:
            eos = eos[0]
        hf = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.d_head,
            "intermediate_size": self.d_mlp,
            "vocab_size": self.d_vocab,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.checkpoint_dtype or "float32",
        }
        if self.model_type == "llama":
            hf |= {"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias}
        if self.model_type == "qwen3":
            hf["attention_bias"] = self.attention_bias
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            layer_types = self.layer_types
            if layer_types is None:
                layer_types = ("sliding_attention" if self.sliding_window else "full_attention",) * self.n_layers
            hf |= {
                "use_sliding_window": self.sliding_window is not None,
                "sliding_window": self.sliding_window,
                "layer_types": list(layer_types),
            }
        return hf

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta(
        cls, params: dict[str, Any], *, d_vocab: int | None = None, source: str = "params.json"
    ) -> LlamaConfig:
        """Reads a Meta release's params.json dict, deriving d_mlp the way Meta's reference code does.

        Args:
            params: the parsed params.json.
            d_vocab: the vocabulary size when params.json says -1 (Llama 2 takes it from the tokenizer);
                read from the embedding's shape by the checkpoint reader.
        """
        handled = {
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "multiple_of",
            "ffn_dim_multiplier",
            "norm_eps",
            "rope_theta",
            "use_scaled_rope",
            "rope_scaling_factor",
            "rope_high_freq_factor",
            "head_dim",
        }
        unknown = sorted(set(params) - handled - META_IGNORED_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: unsupported key(s) {unknown}; llama_lens reads Llama 2 / 3.x text models only"
            )

        read = ConfigValues(params, source)
        d_model, n_heads = read.int("dim", positive=True), read.int("n_heads", positive=True)
        multiple_of = read.int("multiple_of", 256, positive=True)
        vocab = read.int("vocab_size", -1)
        if vocab <= 0:
            if d_vocab is None:
                raise ConfigError(f"{source}: vocab_size is {vocab}; pass d_vocab (the embedding's rows)")
            vocab = d_vocab
        rope_scaling = None
        if read.bool("use_scaled_rope", False):
            # Meta's llama3 reference code: apply_scaling(freqs, scale_factor=8, high_freq_factor=4) with
            # low_freq_factor 1 and an original context of 8192; newer params.json files may override.
            rope_scaling = RopeScaling(
                kind="llama3",
                factor=read.float("rope_scaling_factor", 8.0, positive=True),
                low_freq_factor=1.0,
                high_freq_factor=read.float("rope_high_freq_factor", 4.0, positive=True),
                original_max_position_embeddings=8192,
            )
        return _built(
            cls,
            source,
            d_model=d_model,
            n_layers=read.int("n_layers"),
            n_heads=n_heads,
            n_kv_heads=read.int("n_kv_heads", n_heads),
            d_head=read.int("head_dim", d_model // n_heads),
            d_mlp=meta_d_mlp(d_model, multiple_of, read.float("ffn_dim_multiplier", None, positive=True)),
            d_vocab=vocab,
            rope_theta=read.float("rope_theta", 10000.0, positive=True),
            rope_scaling=rope_scaling,
            norm_eps=read.float("norm_eps", 1e-5, minimum=0.0),
            tie_embeddings=False,
            max_position_embeddings=read.int("max_seq_len", 8192 if rope_scaling else 4096),
        )

    @classmethod
    def from_file(cls, path: str | Path, *, d_vocab: int | None = None) -> LlamaConfig:
        """Reads config.json (HF) or params.json (Meta), chosen by file name."""
        path = Path(path)
        data = read_json_object(path)
        if path.name == "params.json":
            return cls.from_meta(data, d_vocab=d_vocab, source=str(path))
        return cls.from_hf(data, source=str(path))


def _built(cls: type[LlamaConfig], source: str, **fields: Any) -> LlamaConfig:
    """`cls(**fields)`, its checks' errors naming the file they came from."""
    try:
        return cls(**fields)
    except ValueError as err:
        raise ConfigError(f"{source}: {str(err).removeprefix('config: ')}") from None


def _hf_rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and rope scaling from a 4.x (`rope_theta` + `rope_scaling`) or 5.x (`rope_parameters`) config."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params, key = hf.get("rope_scaling"), "rope_scaling"
    if params is not None and not isinstance(params, dict):
        example = '{"rope_type": "linear", "factor": 2.0}'
        raise ConfigError(f"{source}: {key} must be an object such as {example}, got {params!r}")
    params = dict(params or {})
    read = ConfigValues(params, f"{source}: {key}")
    theta = read.float(
        "rope_theta", ConfigValues(hf, source).float("rope_theta", 10000.0, positive=True), positive=True
    )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: {key}.rope_type {kind!r} is not supported; llama_lens implements {list(ROPE_TYPES)}"
        )
    # Keys each rope type reads (rope_type/type name it; rope_theta sits here in 5.x configs). A key outside
    # these would change the frequencies in a way we do not implement (e.g. yarn's beta_fast,
    # partial_rotary_factor), so it is rejected rather than dropped.
    known = {"rope_type", "type", "rope_theta"} | {
        "default": set(),
        # transformers' linear and dynamic types do not read original_max_position_embeddings; configs carry it.
        "linear": {"factor", "original_max_position_embeddings"},
        "dynamic": {"factor", "original_max_position_embeddings"},
        "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    }[kind]
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{source}: {key} of type {kind!r} has unsupported key(s) {unknown}")
    if kind == "default":
        return theta, None
    if "factor" not in params:
        raise ConfigError(f"{source}: {key} of type {kind!r} needs a 'factor'")
    original = read.int("original_max_position_embeddings", None, positive=True)
    if kind == "dynamic":
        # transformers grows the base past max_position_embeddings, whatever the original length says.
        original = ConfigValues(hf, source).int("max_position_embeddings", 2048, positive=True)
    low, high = read.float("low_freq_factor", None, positive=True), read.float("high_freq_factor", None, positive=True)
    if kind == "llama3":
        for needed in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if needed not in params:
                raise ConfigError(f"{source}: {key} of type 'llama3' needs {needed!r}")
        if not low < high:  # the smoothing between them divides by high - low
            raise ConfigError(f"{source}: {key} needs low_freq_factor < high_freq_factor, got {low:g} and {high:g}")
    return theta, RopeScaling(
        kind=kind,
        factor=read.float("factor", positive=True),
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=original,
    )
