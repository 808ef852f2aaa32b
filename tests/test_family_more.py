"""GraniteMoE and PhiMoE on mlx-lm's definitions (model/families.py), checked against
transformers on tiny random checkpoints laid out as published: GraniteMoE's stacked
`block_sparse_moe.input_linear` / `output_linear` and `router.layer`, its embedding, residual,
attention and logits multipliers; PhiMoE's per-expert `block_sparse_moe.experts.N.w1`, its
sparsemixer routing, LayerNorms with biases, q/k/v/o and lm_head biases, LongRoPE (its short
factors for the prompt, its long ones past original_max_position_embeddings)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from model import Engine
from tests.test_families import (
    assert_transformers_logits_and_greedy_text,
    transformers_model,
)
from tests.test_family_deepseek import build_checkpoint

COMMON = dict(vocab_size=32000, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
              num_experts_per_tok=2, max_position_embeddings=4096, initializer_range=0.2,
              tie_word_embeddings=False)  # fmt: skip
# Phi-3.5-MoE's rope_scaling as published (LongRoPE: per-frequency factors, a short and a long
# set, switched at original_max_position_embeddings), at head_dim 16: 8 factors each, and the
# switch at 64 tokens rather than 4,096, so that a short sequence crosses it
ORIGINAL_CONTEXT = 64
LONGROPE = {"type": "longrope", "original_max_position_embeddings": ORIGINAL_CONTEXT,
            "short_factor": [1.0, 1.05, 1.1, 1.2, 1.4, 1.8, 2.5, 3.0],
            "long_factor": [1.0, 1.1, 1.3, 1.8, 2.8, 4.5, 8.0, 12.0],
            "short_mscale": 1.243, "long_mscale": 1.243}  # fmt: skip
FAMILIES = {
    # granite-3.0-1b-a400m's multipliers (top-8 of 32 there)
    "granitemoe": ("GraniteMoe", dict(embedding_multiplier=12.0, logits_scaling=6.0,
                                      residual_multiplier=0.22, attention_multiplier=0.015625,
                                      rms_norm_eps=1e-6)),  # fmt: skip
    # Phi-3.5-MoE: top-2 of 16 by sparsemixer
    "phimoe": ("Phimoe", dict(attention_bias=True, lm_head_bias=True, rms_norm_eps=1e-5,
                              max_position_embeddings=2048, rope_scaling=LONGROPE,
                              original_max_position_embeddings=ORIGINAL_CONTEXT)),  # fmt: skip
}


def published(config: dict) -> dict:
    """GraniteMoE's and PhiMoE's published config.json name the experts `num_local_experts`
    (test_families.published_config renames it to Qwen's `num_experts`); PhiMoE's has its
    LongRoPE `rope_scaling`."""
    config["num_local_experts"] = config.pop("num_experts")
    if config["model_type"] == "phimoe":
        config["rope_scaling"] = LONGROPE
    return config


@pytest.fixture(scope="session")
def more_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("more")
    return {
        family: build_checkpoint(root / family, prefix, {**COMMON, **extra}, fix=published)
        for family, (prefix, extra) in FAMILIES.items()
    }


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_text_are_transformers(more_dirs, family):
    assert_transformers_logits_and_greedy_text(more_dirs[family], family)


def test_phimoe_past_the_original_context_uses_the_long_rope_factors(more_dirs):
    """Past original_max_position_embeddings LongRoPE takes its long factors for the
    whole sequence (Microsoft's Phi-3 LongRoPE code: by max(position_ids) + 1). transformers
    5's PhimoeRotaryEmbedding switches only the mscale there and keeps the short factors, so
    the reference is transformers with the long factors put in the short ones' place."""
    import torch

    path = more_dirs["phimoe"]
    engine = Engine.load(str(path))
    ids = np.random.default_rng(0).integers(3, 32000, size=ORIGINAL_CONTEXT + 36).tolist()
    reference = transformers_model(path)
    reference.config.rope_parameters["short_factor"] = LONGROPE["long_factor"]
    with torch.no_grad():
        out = reference(torch.tensor([ids]), logits_to_keep=1)
    expected = out.logits[0, -1].float().numpy()
    h = engine.model.hidden_states(mx.array([ids]))
    logits = np.array(engine.model.logits(h[0, -1]))
    np.testing.assert_allclose(logits, expected, atol=2e-4 * np.abs(expected).max())
