"""model/names.py: the one checkpoint name table (mlx-lm, Hugging Face, Mistral, GGUF)."""

from __future__ import annotations

import pytest

from model import names
from model.config import ModelArgs, parameter_shapes


def _args(moe: bool) -> ModelArgs:
    config = dict(model_type="mixtral" if moe else "mistral", vocab_size=32, hidden_size=16,
                  intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, rms_norm_eps=1e-5)  # fmt: skip
    if moe:
        config.update(num_local_experts=4, num_experts_per_tok=2)
    return ModelArgs.from_hf_config(config)


@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("layout", ["hf", "mistral", "gguf"])
def test_every_model_weight_has_a_name_in_every_layout(moe, layout):
    for weight in parameter_shapes(_args(moe)):
        assert names.source_name(layout, weight.removesuffix(".weight")) is not None, weight


@pytest.mark.parametrize(
    ("module", "layout", "expected"),
    [
        ("model.embed_tokens", "mistral", "tok_embeddings"),
        ("lm_head", "gguf", "output"),
        ("model.layers.3.self_attn.q_proj", "hf", "model.layers.3.self_attn.q_proj"),
        ("model.layers.3.self_attn.q_proj", "mistral", "layers.3.attention.wq"),
        ("model.layers.12.block_sparse_moe.switch_mlp.down_proj", "hf",
         "model.layers.12.block_sparse_moe.experts.{e}.w2"),
        ("model.layers.12.block_sparse_moe.switch_mlp.up_proj", "mistral",
         "layers.12.{moe}.experts.{e}.w3"),
        ("model.layers.0.block_sparse_moe.gate", "gguf", "blk.0.ffn_gate_inp"),
        ("model.layers.1.mlp.gate_proj", "mistral", "layers.1.feed_forward.w1"),
        ("model.layers.1.rotary_emb", "hf", None),
    ],
)  # fmt: skip
def test_source_names(module, layout, expected):
    assert names.source_name(layout, module) == expected


@pytest.mark.parametrize(
    ("gguf", "expected"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.5.attn_output.weight", "model.layers.5.self_attn.o_proj.weight"),
        ("blk.5.ffn_gate_exps.weight", "model.layers.5.block_sparse_moe.switch_mlp.gate_proj.weight"),
        ("blk.5.ffn_down.7.weight", "model.layers.5.block_sparse_moe.experts.7.w2.weight"),
        ("blk.5.ffn_up.weight", "model.layers.5.mlp.up_proj.weight"),
        ("blk.5.ffn_gate_inp.weight", "model.layers.5.block_sparse_moe.gate.weight"),
        ("rope_freqs.weight", "rope_freqs.weight"),  # unknown: unchanged
        ("output", "output"),
    ],
)  # fmt: skip
def test_gguf_names(gguf, expected):
    assert names.gguf_to_mlx(gguf) == expected


def test_every_gguf_name_maps_back_to_its_module():
    for weight in parameter_shapes(_args(True)):
        module = weight.removesuffix(".weight")
        gguf = names.source_name("gguf", module)
        assert names.gguf_to_mlx(gguf + ".weight") == weight


def test_per_expert_names_round_trip():
    for proj, hf in names.EXPERT_PROJECTIONS.items():
        single = names.expert_tensor(4, proj, "scales", expert=6)
        assert single == f"model.layers.4.block_sparse_moe.experts.6.{hf}.scales"
        assert names.per_expert_name(single) == (names.expert_tensor(4, proj, "scales"), 6)
    assert names.per_expert_name("model.layers.4.block_sparse_moe.gate.weight") is None
