"""Checkpoint tensor names: one table for every layout mixchat reads (Hugging Face, Mistral's
consolidated format, GGUF) and the mlx-lm names the model uses, and the tokenizer files that
travel with a checkpoint. Loading (model/weights.py, model/mixtral.py), quantizing
(quantize/sources.py), evaluating (quantize/evaluate.py) and sharding (model/distributed) read
names from here only.

Names are written without their ".weight" suffix, with placeholders: {i} a layer, {e} an expert,
{moe} where a Mistral checkpoint keeps its MoE layers ("feed_forward" or "block_sparse_moe").
"""

from __future__ import annotations

import re
from functools import cache

EXPERT_MARK = ".block_sparse_moe.switch_mlp."  # mlx-lm: a layer's experts stacked [E, out, in]
PER_EXPERT_MARK = ".block_sparse_moe.experts."  # Hugging Face: one tensor per expert
PARTS = ("weight", "scales", "biases")  # a (quantized) matrix's tensors in mlx-lm's layout
EXPERT_PARTS = (*PARTS, "bias")  # and an expert projection's own bias (gpt-oss), when it has one
# Where each family keeps a layer's stacked experts (mlx-lm's module paths inside a layer):
# Mixtral, granitemoe and phimoe under block_sparse_moe; Qwen-MoE, OLMoE and DeepSeek under mlp;
# gpt-oss's are mlp.experts. Shared experts (mlp.shared_expert(s)) and routers are not experts here:
# they stay resident under a budget.
EXPERT_MODULES = ("block_sparse_moe.switch_mlp", "mlp.switch_mlp", "mlp.experts")
_STACKED = re.compile(
    r"\.(?:block_sparse_moe\.switch_mlp|mlp\.switch_mlp|mlp\.experts)\.(?:gate|up|down)_proj\."
)
# one expert's own tensor, or gpt-oss's published experts (all of a layer's in one unstacked
# tensor: `mlp.experts.gate_up_proj[_blocks|_scales|_bias]`, float [E, in, 2*out] or MXFP4):
# experts mlx-lm's sanitize must still convert before they can stream
_PER_EXPERT = re.compile(
    r"\.(?:block_sparse_moe|mlp)\.experts\.\d+\."
    r"|\.mlp\.experts\.(?:gate_up_proj|down_proj)(?:_blocks|_scales|_bias)?$"
)
# mlx-lm's expert projections and the Hugging Face / Mistral name of each.
EXPERT_PROJECTIONS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
PROJECTION_OF = {hf: mlx for mlx, hf in EXPERT_PROJECTIONS.items()}  # "w1" -> "gate_proj"

# One row per module: its names in mlx-lm (the model's own), Hugging Face, Mistral's consolidated
# format and GGUF. Rows below LAYER_TABLE's line are inside layer {i}, under the prefixes of
# LAYER_PREFIXES.
LAYOUTS = ("mlx", "hf", "mistral", "gguf")
# fmt: off
TABLE = [
    ("model.embed_tokens", "model.embed_tokens", "tok_embeddings", "token_embd"),
    ("model.norm",         "model.norm",         "norm",           "output_norm"),
    ("lm_head",            "lm_head",            "output",         "output"),
]
LAYER_PREFIXES = ("model.layers.{i}.", "model.layers.{i}.", "layers.{i}.", "blk.{i}.")
LAYER_TABLE = [
    ("input_layernorm",          "input_layernorm",          "attention_norm", "attn_norm"),
    ("post_attention_layernorm", "post_attention_layernorm", "ffn_norm",       "ffn_norm"),
    ("self_attn.q_proj",         "self_attn.q_proj",         "attention.wq",   "attn_q"),
    ("self_attn.k_proj",         "self_attn.k_proj",         "attention.wk",   "attn_k"),
    ("self_attn.v_proj",         "self_attn.v_proj",         "attention.wv",   "attn_v"),
    ("self_attn.o_proj",         "self_attn.o_proj",         "attention.wo",   "attn_output"),
    ("block_sparse_moe.gate",    "block_sparse_moe.gate",    "{moe}.gate",     "ffn_gate_inp"),
    ("block_sparse_moe.switch_mlp.gate_proj", "block_sparse_moe.experts.{e}.w1",
     "{moe}.experts.{e}.w1", "ffn_gate_exps"),
    ("block_sparse_moe.switch_mlp.up_proj", "block_sparse_moe.experts.{e}.w3",
     "{moe}.experts.{e}.w3", "ffn_up_exps"),
    ("block_sparse_moe.switch_mlp.down_proj", "block_sparse_moe.experts.{e}.w2",
     "{moe}.experts.{e}.w2", "ffn_down_exps"),
    ("mlp.gate_proj",            "mlp.gate_proj",            "feed_forward.w1", "ffn_gate"),
    ("mlp.up_proj",              "mlp.up_proj",              "feed_forward.w3", "ffn_up"),
    ("mlp.down_proj",            "mlp.down_proj",            "feed_forward.w2", "ffn_down"),
]
# GGUF files may also keep one tensor per expert: Hugging Face's per-expert names (the loader
# stacks them as it stacks a Hugging Face checkpoint's).
GGUF_PER_EXPERT = [
    ("blk.{i}.ffn_gate.{e}", "model.layers.{i}.block_sparse_moe.experts.{e}.w1"),
    ("blk.{i}.ffn_up.{e}",   "model.layers.{i}.block_sparse_moe.experts.{e}.w3"),
    ("blk.{i}.ffn_down.{e}", "model.layers.{i}.block_sparse_moe.experts.{e}.w2"),
]
# fmt: on
ROWS = TABLE + [
    tuple(prefix + name for prefix, name in zip(LAYER_PREFIXES, row)) for row in LAYER_TABLE
]

# Tokenizer files: those of a Hugging Face directory (copied next to quantized weights), and the
# files that hold the vocabulary itself (a checkpoint without one has no tokenizer).
HF_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
MISTRAL_TOKENIZER_FILES = ("tokenizer.model.v*", "tekken.json")  # glob patterns
VOCABULARY_FILES = ("tokenizer.model", "tokenizer.json", "tekken.json")


def _pattern(template: str) -> re.Pattern:
    """A name template as a regex: {i} and {e} match numbers, {moe} Mistral's two MoE names."""
    groups = {
        "{i}": r"(?P<i>\d+)",
        "{e}": r"(?P<e>\d+)",
        "{moe}": r"(?P<moe>feed_forward|block_sparse_moe)",
    }
    parts = re.split(r"(\{i\}|\{e\}|\{moe\})", template)
    return re.compile("".join(groups.get(p, re.escape(p)) for p in parts))


@cache
def _module_patterns() -> list[tuple[re.Pattern, tuple[str, ...]]]:
    return [(_pattern(row[0]), row) for row in ROWS]


def source_name(layout: str, module: str) -> str | None:
    """The name `layout` ("hf", "mistral", "gguf") gives mlx-lm module `module` (no ".weight"),
    its layer filled in and {e} (an expert) and {moe} left as placeholders; None if unknown."""
    column = LAYOUTS.index(layout)
    for pattern, row in _module_patterns():
        if m := pattern.fullmatch(module):
            return row[column].replace("{i}", m.groupdict().get("i") or "")
    return None


@cache
def _gguf_patterns() -> list[tuple[re.Pattern, str]]:
    per_expert = [(_pattern(gguf), hf) for gguf, hf in GGUF_PER_EXPERT]
    return per_expert + [(_pattern(row[3]), row[0]) for row in ROWS]


def gguf_to_mlx(name: str) -> str:
    """A GGUF tensor's name under the model's names ("blk.0.attn_q.weight" ->
    "model.layers.0.self_attn.q_proj.weight"); per-expert GGUF tensors get Hugging Face's
    per-expert names (the loader stacks them). Unknown names come back unchanged."""
    module, dot, part = name.rpartition(".")
    if not dot:
        return name
    for pattern, target in _gguf_patterns():
        if m := pattern.fullmatch(module):
            found = {k: v for k, v in m.groupdict().items() if v is not None}
            return target.format(**found) + "." + part
    return name


def is_expert_tensor(name: str) -> bool:
    """Whether `name` is a layer's stacked expert tensor, in any family's module (EXPERT_MODULES)."""
    return _STACKED.search(name) is not None


def is_per_expert_tensor(name: str) -> bool:
    """Whether `name` is one expert's own tensor, as Hugging Face checkpoints keep them
    ("...block_sparse_moe.experts.3.w1.weight", "...mlp.experts.3.gate_proj.weight")."""
    return _PER_EXPERT.search(name) is not None


def stacked_expert_tensor(layer: int, module: str, proj: str, part: str = "weight") -> str:
    """Layer `layer`'s stacked expert tensor under `module` (one of EXPERT_MODULES)."""
    return f"model.layers.{layer}.{module}.{proj}.{part}"


def per_expert_name(name: str) -> tuple[str, int] | None:
    """A Hugging Face per-expert tensor ("...block_sparse_moe.experts.3.w1.weight") -> (the
    stacked tensor it belongs to, "...block_sparse_moe.switch_mlp.gate_proj.weight", and the
    expert, 3); None for any other name."""
    if PER_EXPERT_MARK not in name:
        return None
    prefix, rest = name.split(PER_EXPERT_MARK, 1)
    expert, hf, part = rest.split(".", 2)
    return f"{prefix}{EXPERT_MARK}{PROJECTION_OF.get(hf, hf)}.{part}", int(expert)


def experts_module(layer: int, expert: int | None = None) -> str:
    """Layer `layer`'s experts: mlx-lm's stacked module, or expert `expert`'s own (HF)."""
    moe = f"model.layers.{layer}.block_sparse_moe"
    return f"{moe}.switch_mlp" if expert is None else f"{moe}.experts.{expert}"


def expert_tensor(layer: int, proj: str, part: str = "weight", expert: int | None = None) -> str:
    """Layer `layer`'s expert tensor `proj` ("gate_proj"...) `part`: stacked under mlx-lm's name,
    or expert `expert`'s own under Hugging Face's."""
    if expert is None:
        return f"{experts_module(layer)}.{proj}.{part}"
    return f"{experts_module(layer, expert)}.{EXPERT_PROJECTIONS[proj]}.{part}"


# ----------------------------------------------------------------------------- MoE families
# Families run on mlx-lm's definitions (model/families.py). Their mlx-lm names are the published
# Hugging Face names except the experts, stacked under `switch_mlp`; GGUF files name them as
# llama.cpp does (gguf-py's TensorNameMap: tests/test_family_tools.py checks this table against
# it). A new family is a row here.

# fmt: off
# model_type -> (mlx-lm's stacked experts, the published per-expert module), under layer {i};
# {p} a projection, {e} an expert.
FAMILY_EXPERTS = {
    "qwen3_moe": ("mlp.switch_mlp.{p}", "mlp.experts.{e}.{p}"),
    "qwen2_moe": ("mlp.switch_mlp.{p}", "mlp.experts.{e}.{p}"),
    "olmoe":     ("mlp.switch_mlp.{p}", "mlp.experts.{e}.{p}"),
}
# GGUF general.architecture -> (model_type, config.json values llama.cpp leaves implicit)
GGUF_FAMILIES = {
    "qwen3moe": ("qwen3_moe", {"norm_topk_prob": True}),
    "qwen2moe": ("qwen2_moe", {"norm_topk_prob": False}),
    "olmoe":    ("olmoe",     {"norm_topk_prob": False}),
    "granitemoe": ("granitemoe", {}),
    "phimoe":   ("phimoe",    {}),
    "gpt-oss":  ("gpt_oss",   {}),  # completed by model/gguf_gpt_oss.py's gpt_oss_config
}
# config.json field <- GGUF metadata key (after "<arch>."), as llama.cpp's converter writes them
GGUF_FAMILY_CONFIG = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "intermediate_size": "feed_forward_length",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "vocab_size": "vocab_size",
}
# and an architecture's own: GraniteMoE's multipliers (llama.cpp's converter names them scales),
# PhiMoE's LongRoPE switch
GGUF_FAMILY_CONFIG_OF = {
    "phimoe": {"original_max_position_embeddings": "rope.scaling.original_context_length"},
    "granitemoe": {"attention_multiplier": "attention.scale",
                   "embedding_multiplier": "embedding_scale",
                   "residual_multiplier": "residual_scale",
                   "logits_scaling": "logit_scale"},
    "gpt-oss": {"sliding_window": "attention.sliding_window"},
}
# mlx-lm module inside layer {i} <- llama.cpp's name inside blk.{i} (whichever a family has)
GGUF_FAMILY_LAYER = [
    ("input_layernorm",               "attn_norm"),
    ("post_attention_layernorm",      "ffn_norm"),
    ("self_attn.q_proj",              "attn_q"),
    ("self_attn.k_proj",              "attn_k"),
    ("self_attn.v_proj",              "attn_v"),
    ("self_attn.o_proj",              "attn_output"),
    ("self_attn.q_norm",              "attn_q_norm"),
    ("self_attn.k_norm",              "attn_k_norm"),
    ("mlp.gate",                      "ffn_gate_inp"),
    ("mlp.switch_mlp.gate_proj",      "ffn_gate_exps"),
    ("mlp.switch_mlp.up_proj",        "ffn_up_exps"),
    ("mlp.switch_mlp.down_proj",      "ffn_down_exps"),
    ("mlp.shared_expert.gate_proj",   "ffn_gate_shexp"),
    ("mlp.shared_expert.up_proj",     "ffn_up_shexp"),
    ("mlp.shared_expert.down_proj",   "ffn_down_shexp"),
    ("mlp.shared_expert_gate",        "ffn_gate_inp_shexp"),
    ("mlp.gate_proj",                 "ffn_gate"),  # a dense layer (Qwen's mlp_only_layers)
    ("mlp.up_proj",                   "ffn_up"),
    ("mlp.down_proj",                 "ffn_down"),
]
# where a family's mlx-lm module differs from GGUF_FAMILY_LAYER's (GraniteMoE's MoE block is
# `block_sparse_moe`; llama.cpp's converter splits its fused `input_linear` [E, 2 * ffn, hidden]
# into ffn_gate_exps (first half) and ffn_up_exps, as mlx-lm's sanitize splits it)
GGUF_FAMILY_LAYER_OF = {
    "deepseek2": [  # MLA; attn_k_b/attn_v_b (newer files) or attn_kv_b: gguf_deepseek.py
        ("self_attn.q_a_proj",            "attn_q_a"),
        ("self_attn.q_a_layernorm",       "attn_q_a_norm"),
        ("self_attn.q_b_proj",            "attn_q_b"),
        ("self_attn.kv_a_proj_with_mqa",  "attn_kv_a_mqa"),
        ("self_attn.kv_a_layernorm",      "attn_kv_a_norm"),
        ("self_attn.gguf_kv_b",           "attn_kv_b"),
        ("self_attn.embed_q",             "attn_k_b"),
        ("self_attn.unembed_out",         "attn_v_b"),
        ("mlp.shared_experts.gate_proj",  "ffn_gate_shexp"),
        ("mlp.shared_experts.up_proj",    "ffn_up_shexp"),
        ("mlp.shared_experts.down_proj",  "ffn_down_shexp"),
    ],
    "granitemoe": [
        ("block_sparse_moe.router.layer",         "ffn_gate_inp"),
        ("block_sparse_moe.switch_mlp.gate_proj", "ffn_gate_exps"),
        ("block_sparse_moe.switch_mlp.up_proj",   "ffn_up_exps"),
        ("block_sparse_moe.switch_mlp.down_proj", "ffn_down_exps"),
    ],
    "phimoe": [  # the converter stacks the published experts' w1, w3, w2
        ("block_sparse_moe.gate",                 "ffn_gate_inp"),
        ("block_sparse_moe.switch_mlp.gate_proj", "ffn_gate_exps"),
        ("block_sparse_moe.switch_mlp.up_proj",   "ffn_up_exps"),
        ("block_sparse_moe.switch_mlp.down_proj", "ffn_down_exps"),
    ],
    "gpt-oss": [  # convert_hf_to_gguf.py's GptOssModel: see model/gguf_gpt_oss.py
        ("post_attention_layernorm",              "post_attention_norm"),
        ("self_attn.sinks",                       "attn_sinks"),
        ("mlp.router",                            "ffn_gate_inp"),
        ("mlp.experts.gate_proj",                 "ffn_gate_exps"),
        ("mlp.experts.up_proj",                   "ffn_up_exps"),
        ("mlp.experts.down_proj",                 "ffn_down_exps"),
    ],
}
# whole names inside blk.{i} (module and part): DeepSeek-V3's e_score_correction_bias, which the
# converter's DeepseekV2Model.modify_tensors renames to e_score_correction.bias -> exp_probs_b.bias
GGUF_FAMILY_NAMES_OF = {"deepseek2": {"exp_probs_b.bias": "mlp.gate.e_score_correction_bias"}}
# tensors that are config.json values, not weights: PhiMoE's LongRoPE factors (convert_hf_to_gguf.
# py's Phi3MiniModel writes rope_scaling's long_factor and short_factor as these F32 vectors)
GGUF_CONFIG_TENSORS = {"rope_factors_long.weight": "long_factor",
                       "rope_factors_short.weight": "short_factor"}
# llama.cpp's converter permutes these rows for adjacent-pair RoPE (convert_hf_to_gguf.py's
# LlamaModel.permute, which GraniteModel inherits): architecture -> {name inside blk.{i}: the
# metadata key of its head count}; model/gguf.py's load_tensor undoes it
GGUF_PERMUTED = {
    "granitemoe": {"attn_q": "attention.head_count", "attn_k": "attention.head_count_kv"},
}
# fmt: on
# llama.cpp stores these [1, hidden] matrices as vectors [hidden]
GGUF_ROW_VECTORS = ("mlp.shared_expert_gate",)
# parameters without a ".weight" in mlx-lm that llama.cpp's converter names "….weight"
# (GptOssModel.filter_tensors: the attention sinks)
GGUF_BARE = ("self_attn.sinks",)


@cache
def _family_gguf_patterns(arch: str = "") -> list[tuple[re.Pattern, str]]:
    top = [(_pattern(row[3]), row[0]) for row in TABLE]
    rows = GGUF_FAMILY_LAYER_OF.get(arch, []) + GGUF_FAMILY_LAYER  # the family's own first
    layer = [(_pattern("blk.{i}." + gguf), "model.layers.{i}." + mlx)
             for mlx, gguf in rows]  # fmt: skip
    return top + layer


def family_gguf_to_mlx(name: str, arch: str = "") -> str:
    """A family GGUF tensor's name under mlx-lm's ("blk.0.ffn_gate_exps.weight" ->
    "model.layers.0.mlp.switch_mlp.gate_proj.weight"), for GGUF architecture `arch`; unknown
    names come back unchanged."""
    whole = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if whole and whole[2] in GGUF_FAMILY_NAMES_OF.get(arch, {}):
        return f"model.layers.{whole[1]}.{GGUF_FAMILY_NAMES_OF[arch][whole[2]]}"
    module, dot, part = name.rpartition(".")
    for pattern, target in _family_gguf_patterns(arch):
        if dot and (m := pattern.fullmatch(module)):
            mlx = target.format(**m.groupdict())
            return mlx if mlx.endswith(GGUF_BARE) and part == "weight" else f"{mlx}.{part}"
    return name


def family_source_name(model_type: str, name: str) -> tuple[str, bool]:
    """A family parameter's published name (mlx-lm's "model.layers.0.mlp.switch_mlp.up_proj.
    weight" -> ("model.layers.0.mlp.experts.{e}.up_proj.weight", True): one tensor per expert
    {e}); any other parameter keeps its name (False)."""
    if model_type not in FAMILY_EXPERTS:  # mlx-lm's sanitize reads its published layout
        return name, False
    stacked, per_expert = FAMILY_EXPERTS[model_type]
    head = stacked.split("{p}")[0]
    m = re.fullmatch(r"(model\.layers\.\d+\.)" + re.escape(head) + r"(\w+)\.(\w+)", name)
    if m is None:
        return name, False
    prefix, p, part = m.groups()
    return prefix + per_expert.replace("{p}", p) + "." + part, True
