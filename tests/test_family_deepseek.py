"""DeepSeek-V2 and DeepSeek-V3 on mlx-lm's definitions (model/families.py): multi-head latent
attention, shared experts, group-limited routing (V3: sigmoid scores plus the
e_score_correction_bias; V2: softmax, `topk_method` group_limited_greedy) and dense first
layers, checked against transformers on tiny random checkpoints laid out as published."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from model import Engine
from model.errors import MixchatError
from tests.checkpoints import mistral_tokenizer_file
from tests.test_cli import mixchat
from tests.test_families import (
    CHATML,
    PROMPT,
    TOKENS,
    _reply,
    published_config,
    transformers_greedy,
    transformers_model,
)

MLA = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
           n_routed_experts=8, kv_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
           qk_nope_head_dim=16, first_k_dense_replace=1, max_position_embeddings=4096,
           rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False)  # fmt: skip
# DeepSeek-V2-Lite's published rope_scaling (YaRN; mlx-lm's V2 definition requires one)
V2_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}  # fmt: skip
# top-3 of 8 in 2 groups of 4, one group kept: a token's experts all come from one group
FAMILIES = {
    # DeepSeek-V3/R1: q through a low-rank q_a/q_b, sigmoid routing with the correction bias
    "deepseek_v3": ("DeepseekV3", dict(q_lora_rank=48, n_group=2, topk_group=1,
                                       num_experts_per_tok=3, routed_scaling_factor=2.5,
                                       norm_topk_prob=True)),  # fmt: skip
    # DeepSeek-V2: softmax routing limited to the best groups (V2-Lite: no q_lora_rank)
    "deepseek_v2": ("DeepseekV2", dict(q_lora_rank=None, n_group=2, topk_group=1,
                                       num_experts_per_tok=3, topk_method="group_limited_greedy",
                                       routed_scaling_factor=2.0, norm_topk_prob=False,
                                       rope_scaling=V2_YARN)),  # fmt: skip
}
MOE_LAYERS = MLA["num_hidden_layers"] - MLA["first_k_dense_replace"]


def build_checkpoint(path, prefix: str, config_kwargs: dict, seed: int = 0, fix=None,
                     positive_bias: bool = False):  # fmt: skip
    """A tiny random transformers `prefix` model saved as published (`published_config`, then
    `fix(config)`), with a tokenizer.json (the real Mistral v1 vocabulary) and a ChatML
    template. Norms and router biases are perturbed from their 1.0 / 0.0 start, so that a
    missed one shows (`positive_bias`: DeepSeek-V3's e_score_correction_bias all >= 0)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(**{"rope_theta": 1e4, **config_kwargs})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "e_score_correction_bias" in name:
                bias = torch.randn_like(p) * 0.3
                p.copy_(bias.abs() if positive_bias else bias)
    model.eval().save_pretrained(path)
    config_file = path / "config.json"
    published = published_config(json.loads(config_file.read_text()))
    config_file.write_text(json.dumps(fix(published) if fix else published, indent=2))
    shutil.copy(mistral_tokenizer_file("v1"), path / "tokenizer.model")
    tok = transformers.LlamaTokenizer.from_pretrained(str(path), add_bos_token=False)
    (path / "tokenizer.model").unlink()
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return path


def deepseek_config(config: dict) -> dict:
    """DeepSeek's published config.json: `n_routed_experts`, no head_dim (transformers v5
    adds `head_dim`/`qk_head_dim`, derived from the MLA dimensions)."""
    for key in ("head_dim", "qk_head_dim"):
        config.pop(key, None)
    if config["model_type"] == "deepseek_v2":
        config["rope_scaling"] = V2_YARN
    assert "n_routed_experts" in config and "num_experts" not in config
    return config


@pytest.fixture(scope="session")
def deepseek_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    return {
        family: build_checkpoint(root / family, prefix, {**MLA, **extra}, fix=deepseek_config)
        for family, (prefix, extra) in FAMILIES.items()
    }


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_text_are_transformers(deepseek_dirs, family):
    import torch

    path = deepseek_dirs[family]
    engine = Engine.load(str(path))
    assert engine.info.architecture == family and engine.info.num_experts == 8
    ids = engine.prompt_ids(prompt=PROMPT)
    with torch.no_grad():
        expected = transformers_model(path)(torch.tensor([ids])).logits.float().numpy()
    engine.model.routing = routing = []
    logits = np.array(engine.model(mx.array([ids])))
    engine.model.routing = None
    np.testing.assert_allclose(logits, expected, atol=2e-4 * np.abs(expected).max())
    # the routers' own choices, [B, T, k] per MoE layer (the dense first layer has none):
    # group-limited, each token's 3 experts lie in one group of 4
    assert len(routing) == MOE_LAYERS
    for ids_k in routing:
        chosen = np.array(ids_k)
        assert chosen.shape == (1, len(ids), 3)
        assert (chosen // 4 == chosen[..., :1] // 4).all()
        assert (np.sort(chosen, axis=-1)[..., 1:] != np.sort(chosen, axis=-1)[..., :-1]).all()
    text, tokens = _reply(engine)
    reference = transformers_greedy(path, ids, TOKENS)
    assert tokens == reference[: len(tokens)] and len(tokens) >= TOKENS - 1
    assert text == engine.tokenizer.decode(reference[: len(tokens) + 1])
    # the experts panel's counts: each MoE layer routed each generated token to 3 experts
    assert engine.last_routing.shape == (MOE_LAYERS, 8)
    assert (engine.last_routing.sum(axis=1) == 3 * len(tokens) + 3).all()


def test_ask_raw_prints_transformers_greedy_text(deepseek_dirs):
    path = deepseek_dirs["deepseek_v3"]
    result = mixchat("ask", "--raw", "--model", str(path), "--temp", "0", "--max-tokens",
                     str(TOKENS), "--json", PROMPT)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    engine = Engine.load(str(path))
    reference = transformers_greedy(path, engine.prompt_ids(prompt=PROMPT), TOKENS)
    assert json.loads(result.stdout)["text"] == engine.tokenizer.decode(reference)


def test_the_correction_bias_stays_float32_in_half_precision(deepseek_dirs):
    """As published and as mlx-lm keeps it (its cast_predicate): in bfloat16 the router's
    e_score_correction_bias stays float32, where bfloat16 would move near-tied experts."""
    engine = Engine.load(str(deepseek_dirs["deepseek_v3"]), dtype="bfloat16")
    mlp = engine.model.layers[1].mlp
    assert mlp.gate.e_score_correction_bias.dtype == mx.float32
    assert mlp.gate.weight.dtype == mx.bfloat16 and mlp.shared_experts.up_proj.weight.dtype == mx.bfloat16


def test_a_quantized_kv_cache_is_refused_in_one_line(deepseek_dirs):
    with pytest.raises(MixchatError) as e:
        Engine.load(str(deepseek_dirs["deepseek_v3"]), kv_bits=8)
    message = str(e.value)
    assert "quantized KV cache" in message and "\n" not in message


def test_mlx_community_4bit_directory_runs_as_mlx_lm(tmp_path_factory):
    """An `mlx_lm.convert -q` of a published-layout DeepSeek-V3 (mlx-community's 4-bit
    releases: experts stacked, kv_b_proj split into embed_q/unembed_out and requantized): the
    same greedy tokens as mlx-lm's own generation. Its correction biases are >= 0, where
    mlx-lm's masking of the dropped groups (0.0) and the published one (-inf) choose alike."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    root = tmp_path_factory.mktemp("v3-4bit")
    prefix, extra = FAMILIES["deepseek_v3"]
    source = build_checkpoint(root / "hf", prefix, {**MLA, **extra}, seed=1,
                              fix=deepseek_config, positive_bias=True)  # fmt: skip
    out = root / "m"
    mlx_lm.convert(str(source), str(out), quantize=True, q_bits=4, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    engine = Engine.load(str(out))
    assert engine.info.architecture == "deepseek_v3"
    assert engine.info.quantization.startswith("4-bit")
    _, tokens = _reply(engine)
    model, tokenizer = mlx_lm.load(str(out))
    expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT,
                                                         max_tokens=TOKENS,
                                                         sampler=make_sampler(0.0))]  # fmt: skip
    assert tokens == expected[: len(tokens)] and len(tokens) >= TOKENS - 1
