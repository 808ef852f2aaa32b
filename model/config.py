"""ModelArgs: the one place where the naming differences of checkpoint formats are absorbed.

Sources: a Hugging Face config.json (also what mlx_lm.convert writes, with its `quantization`
block), Mistral's own params.json, and GGUF metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError, UnsupportedModelError

SUPPORTED_TYPES = ("mixtral", "mistral", "llama")  # mixchat's own definition (model/mixtral.py)
# MoE families run on mlx-lm's own definitions (model/families.py); their experts stream under a
# budget through model/offload/ as Mixtral's do.
FAMILY_TYPES = (
    "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3", "granitemoe",
    "phimoe",
)  # fmt: skip
# The families `mixchat quantize` converts as `mlx_lm.convert -q` does, tensor for tensor
# (tests/test_family_tools.py, test_family_tools_more.py; gpt-oss's MXFP4 experts kept as they are)
QUANTIZE_TYPES = SUPPORTED_TYPES + FAMILY_TYPES


@dataclass
class ModelArgs:
    model_type: str  # "mixtral" (sparse MoE) | "mistral" | "llama" (dense) | a FAMILY_TYPES one
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    num_local_experts: int = 0  # 0: dense model with a plain SwiGLU MLP
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_traditional: bool = False  # GGUF llama files store Q/K for adjacent-pair RoPE
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # mlx_lm-style quantization block: {"group_size", "bits", "mode", "<module path>": {...}|False}
    quantization: dict[str, Any] | None = None
    # a FAMILY_TYPES model's whole config.json ("config"): mlx-lm's ModelArgs.from_dict reads it
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_TYPES + FAMILY_TYPES:
            raise UnsupportedModelError(
                f"unsupported architecture '{self.model_type}' "
                f"(mixchat runs {', '.join(SUPPORTED_TYPES + FAMILY_TYPES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise CheckpointError(f"{name} must be positive (got {getattr(self, name)})")
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise CheckpointError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise CheckpointError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and "
                f"num_local_experts {self.num_local_experts}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def is_family(self) -> bool:
        """Run on mlx-lm's definition of its architecture (model/families.py), not ours."""
        return self.model_type in FAMILY_TYPES

    @property
    def kv_group_size(self) -> int | None:
        """Group size of a quantized KV cache (None: the head dimension does not allow one)."""
        return next((g for g in (64, 32) if self.head_dim % g == 0), None)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """From a Hugging Face (or mlx_lm) config.json dictionary."""
        model_type = config.get("model_type")
        if model_type is None:
            archs = config.get("architectures") or ["?"]
            raise UnsupportedModelError(
                f"config.json has no model_type (architectures: {archs[0]})"
            )
        rope = config.get("rope_parameters") or {}
        rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = config.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = rope
        family = model_type in FAMILY_TYPES
        if family:  # experts as published: `num_experts` (Qwen, OLMoE), `n_routed_experts`
            # (DeepSeek), `num_local_experts` (GraniteMoE, PhiMoE; transformers v5 for all)
            experts = (config.get("num_experts") or config.get("n_routed_experts")
                       or config.get("num_local_experts") or 0)  # fmt: skip
        else:
            experts = config.get("num_local_experts") or 0 if model_type == "mixtral" else 0
        try:
            return cls(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                # a family's experts' width (Qwen's moe_intermediate_size; OLMoE has only one)
                intermediate_size=int(
                    (family and config.get("moe_intermediate_size")) or config["intermediate_size"]
                ),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=int(config["num_attention_heads"]),
                num_key_value_heads=int(
                    config.get("num_key_value_heads") or config["num_attention_heads"]
                ),
                head_dim=int(config.get("head_dim") or 0),
                num_local_experts=int(experts),
                num_experts_per_tok=int(config.get("num_experts_per_tok") or 2),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                rope_traditional=bool(config.get("rope_traditional", False)),
                rope_scaling=rope_scaling,
                sliding_window=config.get("sliding_window")  # mlx-lm's families use none
                if config.get("use_sliding_window", True) and not family
                else None,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_position_embeddings=int(config.get("max_position_embeddings") or 32768),
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
                quantization=_mlx_quantization(config),
                extra={"config": config} if family else {},
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json has a malformed field: {e}") from None

    @classmethod
    def from_mistral_params(cls, params: dict[str, Any]) -> ModelArgs:
        """From Mistral's own params.json (consolidated checkpoints)."""
        moe = params.get("moe") or {}
        try:
            return cls(
                model_type="mixtral" if moe else "mistral",
                vocab_size=int(params["vocab_size"]),
                hidden_size=int(params["dim"]),
                intermediate_size=int(params["hidden_dim"]),
                num_hidden_layers=int(params["n_layers"]),
                num_attention_heads=int(params["n_heads"]),
                num_key_value_heads=int(params.get("n_kv_heads") or params["n_heads"]),
                head_dim=int(params.get("head_dim") or 0),
                num_local_experts=int(moe.get("num_experts", 0)),
                num_experts_per_tok=int(moe.get("num_experts_per_tok", 2)),
                rms_norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=float(params.get("rope_theta", 10000.0)),
                sliding_window=params.get("sliding_window"),
                tie_word_embeddings=False,
                max_position_embeddings=int(params.get("max_seq_len") or 32768),
            )
        except KeyError as e:
            raise CheckpointError(f"params.json lacks required field {e.args[0]!r}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tensor_names: set[str]) -> ModelArgs:
        """From GGUF metadata (as returned by `mx.load(path, return_metadata=True)`)."""
        arch = _scalar(meta.get("general.architecture"))
        if arch != "llama":
            from .names import GGUF_FAMILIES

            raise UnsupportedModelError(
                f"mixchat does not read {arch} GGUF files (it reads llama, "
                f"{', '.join([*GGUF_FAMILIES, 'deepseek2'])}): run the Hugging Face checkpoint"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            return _scalar(value)

        try:
            num_experts = int(get("expert_count", 0) or 0)
            vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
            heads = int(get("attention.head_count"))
            return cls(
                model_type="mixtral" if num_experts else "llama",
                vocab_size=int(vocab),
                hidden_size=int(get("embedding_length")),
                intermediate_size=int(
                    get("expert_feed_forward_length") or get("feed_forward_length")
                ),
                num_hidden_layers=int(get("block_count")),
                num_attention_heads=heads,
                num_key_value_heads=int(get("attention.head_count_kv") or heads),
                head_dim=int(get("attention.key_length") or 0),
                num_local_experts=num_experts,
                num_experts_per_tok=int(get("expert_used_count", 2) or 2),
                rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(get("rope.freq_base", 10000.0)),
                rope_traditional=True,
                sliding_window=None,
                tie_word_embeddings="output.weight" not in tensor_names,
                max_position_embeddings=int(get("context_length") or 4096),
                bos_token_id=_scalar(meta.get("tokenizer.ggml.bos_token_id")),
                eos_token_id=_scalar(meta.get("tokenizer.ggml.eos_token_id")),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"GGUF metadata is incomplete: {e}") from None


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight of model.mixtral's definition for `args`, under mlx-lm's names, with its
    unquantized shape, in layer order: experts stacked [E, out, in], no lm_head when tied. The
    one place parameter counts and tensor shapes come from (info, quantize)."""
    if args.is_family:  # mlx-lm's definition: its own parameters' shapes (nothing evaluated)
        from .families import parameter_shapes as family_shapes

        return family_shapes(args)
    H, F, V = args.hidden_size, args.intermediate_size, args.vocab_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    E = args.num_local_experts
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (H,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q, H)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv, H)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv, H)
        shapes[f"{p}.self_attn.o_proj.weight"] = (H, q)
        shapes[f"{p}.post_attention_layernorm.weight"] = (H,)
        if args.is_moe:
            moe = f"{p}.block_sparse_moe"
            shapes[f"{moe}.gate.weight"] = (E, H)
            shapes[f"{moe}.switch_mlp.gate_proj.weight"] = (E, F, H)
            shapes[f"{moe}.switch_mlp.up_proj.weight"] = (E, F, H)
            shapes[f"{moe}.switch_mlp.down_proj.weight"] = (E, H, F)
        else:
            shapes[f"{p}.mlp.gate_proj.weight"] = (F, H)
            shapes[f"{p}.mlp.up_proj.weight"] = (F, H)
            shapes[f"{p}.mlp.down_proj.weight"] = (H, F)
    shapes["model.norm.weight"] = (H,)
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def _mlx_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """mlx-lm's quantization block: `quantization`, or `quantization_config` as mlx-lm also
    writes it; a Hugging Face one (GPTQ, AWQ, bitsandbytes, FP8: it names a quant_method) is
    refused rather than misread."""
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "mxfp4" and "group_size" not in q:
        # openai/gpt-oss-* as published: experts in MXFP4 (`*_blocks`, `*_scales`), the rest not
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    if isinstance(q, dict) and "quant_method" in q and "group_size" not in q:
        raise UnsupportedModelError(
            f"checkpoints quantized with {q['quant_method']!r} are not supported: use the "
            "original weights (and `mixchat quantize`) or an MLX-quantized release"
        )
    return q if isinstance(q, dict) else None


def _scalar(value: Any) -> Any:
    """GGUF numbers come back as 0-d mx.arrays; turn them into Python scalars."""
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        return value.item()
    return value
