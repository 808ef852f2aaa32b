"""gpt-oss on mlx-lm's definition (model/families.py): a tiny random checkpoint laid out as
openai/gpt-oss-* publish theirs (`num_local_experts`, `rope_theta` with YaRN `rope_scaling`,
`truncate: false`, alternating sliding/full attention, attention sinks, biased experts), in
float and in MXFP4 (`*_blocks`, `*_scales`, `quantization_config: {quant_method: mxfp4}`).
transformers is the reference; it cannot run MXFP4 on a CPU, so its own dequantization
(`integrations.mxfp4`) turns the same blocks into the float weights it runs."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from model import Engine, GenerationSettings
from tests.checkpoints import mistral_tokenizer_file
from tests.test_cli import mixchat
from tests.test_families import (
    PROMPT,
    TOKENS,
    _reply,
    assert_engine_is_transformers,
    transformers_greedy,
)

HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]
# The harmony format (openai-harmony's description; the structure of openai/gpt-oss-20b's
# chat_template.jinja without tools and dates): a system message with the reasoning effort and
# the channels, the system prompt as the developer's instructions, earlier replies on `final`.
HARMONY = (
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: ' + (reasoning_effort | default('medium')) + "
    "'\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
    "message.<|end|>' }}"
    "{%- set rest = messages %}"
    "{%- if messages and messages[0].role in ('system', 'developer') %}"
    "{{- '<|start|>developer<|message|># Instructions\n\n' + messages[0].content + '\n\n<|end|>' }}"
    "{%- set rest = messages[1:] %}{%- endif %}"
    "{%- for m in rest %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|end|>' }}"
    "{%- else %}{{- '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|start|>assistant{%- endif %}"
)
CONFIG = dict(vocab_size=32064, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
              num_experts_per_tok=2, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"],
              max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
              tie_word_embeddings=False)  # fmt: skip
# gpt-oss-20b's YaRN (factor 32 over 4096 positions), scaled down so that it shows here
ROPE = dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
            original_max_position_embeddings=64, truncate=False)  # fmt: skip
EXPERTS = ("gate_up_proj", "down_proj")


def published(config: dict, **extra) -> dict:
    """As openai/gpt-oss-20b's config.json has it: `rope_theta` and `rope_scaling`, and
    `experts_per_token` beside `num_experts_per_tok` (transformers v5 writes neither)."""
    config = dict(config, **extra)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config["experts_per_token"] = config["num_experts_per_tok"]
    config["torch_dtype"] = config.pop("dtype", "float32")
    return config


def _tokenizer(path) -> None:
    import transformers
    from tokenizers import AddedToken

    shutil.copy(mistral_tokenizer_file("v1"), path / "tokenizer.model")
    tok = transformers.LlamaTokenizer.from_pretrained(str(path), add_bos_token=False)
    (path / "tokenizer.model").unlink()  # a tokenizer.json, as gpt-oss ships
    tok.add_tokens([AddedToken(t, special=True) for t in HARMONY_TOKENS], special_tokens=True)
    tok.chat_template = HARMONY
    tok.save_pretrained(path)


def _rewrite_config(path, **extra) -> None:
    file = path / "config.json"
    file.write_text(json.dumps(published(json.loads(file.read_text()), **extra), indent=2))


def build_gptoss(root, seed: int = 0):
    """(float directory, MXFP4 directory, transformers' float reading of the MXFP4 one)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    torch.manual_seed(seed)
    config = transformers.GptOssConfig(rope_parameters=ROPE, **CONFIG)
    model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():  # norms start at 1 and biases/sinks at 0: perturbed, a missed one shows
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "sinks" in name:
                p.add_(torch.randn_like(p) * 0.1)
    paths = {kind: root / kind for kind in ("float", "mxfp4", "reference")}
    model.eval().save_pretrained(paths["float"])
    _tokenizer(paths["float"])
    for kind in ("mxfp4", "reference"):
        shutil.copytree(paths["float"], paths[kind])
    _rewrite_config(paths["float"])
    _rewrite_config(paths["reference"])
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    _rewrite_config(paths["mxfp4"], quantization_config=quantization)
    # MXFP4 as published: [E, out, in/32, 16] bytes (two E2M1 codes each) + [E, out, in/32] E8M0
    floats = load_file(paths["float"] / "model.safetensors")
    packed, dequantized = {}, {}
    for name, w in floats.items():
        if not name.endswith(EXPERTS):
            packed[name] = dequantized[name] = w
            continue
        out_in = mx.array(w.transpose(1, 2).contiguous().numpy())  # [E, in, out] -> [E, out, in]
        q, scales, *_ = mx.quantize(out_in, group_size=32, bits=4, mode="mxfp4")
        blocks = np.array(q.view(mx.uint8)).reshape(*scales.shape, 16)
        packed[f"{name}_blocks"] = torch.from_numpy(blocks)
        packed[f"{name}_scales"] = torch.from_numpy(np.array(scales))
        dequantized[name] = _convert_moe_packed_tensors(
            packed[f"{name}_blocks"], packed[f"{name}_scales"], dtype=torch.float32
        )
    save_file(packed, paths["mxfp4"] / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, paths["reference"] / "model.safetensors", metadata={"format": "pt"})
    return paths


@pytest.fixture(scope="session")
def gptoss_dirs(tmp_path_factory):
    return build_gptoss(tmp_path_factory.mktemp("gptoss"))


@pytest.mark.parametrize("kind", ["float", "mxfp4"])
def test_logits_and_greedy_text_are_transformers(gptoss_dirs, kind):
    """Past the sliding window (4) and through YaRN: mixchat's logits and greedy tokens are
    transformers' (for MXFP4: transformers' dequantization of the same blocks)."""
    path = gptoss_dirs[kind]
    reference = gptoss_dirs["float" if kind == "float" else "reference"]
    engine = Engine.load(str(path))
    info = engine.info
    assert info.architecture == "gpt_oss" and info.num_experts == 8
    assert info.quantization == ("4-bit mxfp4, group 32" if kind == "mxfp4" else "none (f32)")
    # `info`: a token uses 2 of each layer's 8 experts (their weights and biases)
    H, F, E, L = CONFIG["hidden_size"], CONFIG["intermediate_size"], 8, 2
    expert = 3 * H * F + 2 * F + H
    assert info.total_params - info.active_params == L * (E - 2) * expert
    ids, logits, tokens = assert_engine_is_transformers(engine, reference)
    assert len(ids) > 2 * CONFIG["sliding_window"]
    # the experts panel's counts: each MoE layer's router sent each token to k experts
    assert engine.last_routing.shape == (2, 8)
    assert (engine.last_routing.sum(axis=1) == 2 * len(tokens) + 2).all()


def test_ask_raw_prints_transformers_greedy_text(gptoss_dirs):
    path = gptoss_dirs["mxfp4"]
    result = mixchat("ask", "--raw", "--model", str(path), "--temp", "0", "--max-tokens",
                     str(TOKENS), "--json", PROMPT)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    engine = Engine.load(str(gptoss_dirs["float"]))
    ids = engine.prompt_ids(prompt=PROMPT)
    greedy = transformers_greedy(gptoss_dirs["reference"], ids, TOKENS)
    assert json.loads(result.stdout)["text"] == engine.tokenizer.decode(greedy)


def test_chat_prompt_is_the_harmony_template(gptoss_dirs):
    import transformers

    path = gptoss_dirs["float"]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Where is Paris?"},
                {"role": "assistant", "content": "In France."},
                {"role": "user", "content": "And Rome?"}]  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(path)
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=False)  # fmt: skip
    engine = Engine.load(str(path))
    ids = engine.prompt_ids(messages)
    assert engine.has_chat_template and ids == expected
    assert engine.tokenizer.decode(ids[-2:]) == "assistant"  # the reply's header is the model's


@pytest.mark.parametrize("form", ["mxfp4", "4bit"])
def test_mlx_community_directories_run(gptoss_dirs, tmp_path_factory, form):
    """mlx_lm.convert's output (mlx-community's releases): the published MXFP4 experts stacked
    in MLX's own `mxfp4` mode (the same weights: transformers' greedy tokens), or everything in
    4-bit affine groups (mlx-lm's own greedy tokens, once its YaRN is given the unrounded
    correction range transformers uses: mlx-lm rounds it whatever `truncate` says)."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from model.families import AFTER_BUILD

    root = tmp_path_factory.mktemp(f"gptoss-{form}")
    out = root / "m"
    if form == "mxfp4":
        mlx_lm.convert(str(gptoss_dirs["mxfp4"]), str(out))
    else:
        mlx_lm.convert(str(gptoss_dirs["mxfp4"]), str(root / "f"), dequantize=True)
        mlx_lm.convert(str(root / "f"), str(out), quantize=True, q_bits=4, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"].get("mode", "affine") == form.replace("4bit", "affine")
    engine = Engine.load(str(out))
    assert engine.info.architecture == "gpt_oss"
    _, tokens = _reply(engine)
    if form == "mxfp4":
        ids = engine.prompt_ids(prompt=PROMPT)
        expected = transformers_greedy(gptoss_dirs["reference"], ids, TOKENS)
    else:
        model, tokenizer = mlx_lm.load(str(out))
        AFTER_BUILD["gpt_oss"](model, config)
        expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT,
                                                             max_tokens=TOKENS,
                                                             sampler=make_sampler(0.0))]  # fmt: skip
    assert tokens == expected[: len(tokens)] and len(tokens) >= TOKENS - 1


def test_the_reply_shown_is_the_final_channel(gptoss_dirs):
    """gpt-oss answers in harmony: its reasoning (`analysis`) and tool calls (`commentary`)
    are not shown, the `final` channel is, streamed token by token."""
    engine = Engine.load(str(gptoss_dirs["float"]))
    generated = (
        "<|channel|>analysis<|message|>The user asks about Paris. Answer briefly.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.lookup <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>'
        "<|start|>assistant<|channel|>final<|message|>Paris is in France.<|return|>"
    )
    detokenizer = engine.tokenizer.detokenizer()
    ids = engine.tokenizer.encode(generated)
    shown = "".join(detokenizer.add(i) for i in ids) + detokenizer.finish()
    assert shown == "Paris is in France."
    # a raw completion (no header yet) is shown as it comes
    detokenizer = engine.tokenizer.detokenizer()
    ids = engine.tokenizer.encode(PROMPT)
    assert "".join(detokenizer.add(i) for i in ids) + detokenizer.finish() == PROMPT


def test_a_second_turn_past_the_sliding_window_is_a_fresh_ones(gptoss_dirs):
    """The sliding layers' caches roll over (window 4): a chat's next turn, which reuses the
    cache where it can, gives the tokens a fresh engine gives."""
    settings = GenerationSettings(max_tokens=6, temperature=0.0)
    first = [{"role": "user", "content": "Where is Paris?"}]
    engine = Engine.load(str(gptoss_dirs["float"]))
    reply = "".join(c.text for c in engine.stream(first, settings))
    second = [*first, {"role": "assistant", "content": reply or "?"},
              {"role": "user", "content": "And Rome?"}]  # fmt: skip
    again = "".join(c.text for c in engine.stream(second, settings))
    tokens = engine.cache_state()[1][len(engine.prompt_ids(second)) :]
    fresh = Engine.load(str(gptoss_dirs["float"]))
    assert "".join(c.text for c in fresh.stream(second, settings)) == again
    assert fresh.cache_state()[1][len(fresh.prompt_ids(second)) :] == tokens and tokens
