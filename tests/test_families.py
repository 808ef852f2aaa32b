"""MoE families run on mlx-lm's definitions (model/families.py): tiny random checkpoints laid
out as the published ones are (per-expert tensors, `num_experts`, `rope_theta`), built with
transformers, which is the reference for their greedy text and logits."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from model import Engine, GenerationSettings
from tests.checkpoints import mistral_tokenizer_file
from tests.test_cli import mixchat

PROMPT = "Once upon a time, in a land far away,"
TOKENS = 10
# Qwen's ChatML template (as Qwen3's tokenizer_config.json has it, without tools and thinking)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
COMMON = dict(vocab_size=32000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
              initializer_range=0.2, num_experts_per_tok=2, tie_word_embeddings=False)  # fmt: skip
FAMILIES = {
    # top-2 of 8, normalised (Qwen3-30B-A3B: top-8 of 128); a per-head q/k norm
    "qwen3_moe": (
        "Qwen3Moe",
        dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=8,
            norm_topk_prob=True,
            head_dim=16,
        ),
    ),  # fmt: skip
    # a shared expert behind its sigmoid gate; q/k/v biases
    "qwen2_moe": (
        "Qwen2Moe",
        dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=8,
            shared_expert_intermediate_size=96,
        ),
    ),  # fmt: skip
    # q/k norms over all heads, unnormalised top-k
    "olmoe": ("Olmoe", dict(intermediate_size=64, num_experts=8, eos_token_id=2)),
}


def published_config(config: dict) -> dict:
    """transformers v5 writes `rope_parameters`, `num_local_experts` and `dtype`; the published
    checkpoints (and what people download) have `rope_theta`, `num_experts`, `torch_dtype`."""
    config = dict(config)
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    config["rope_scaling"] = None
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    config["torch_dtype"] = config.pop("dtype", "float32")
    return config


def build_family(path, family: str, seed: int = 0):
    """A tiny random `family` checkpoint written as published, with a tokenizer.json (the real
    Mistral v1 vocabulary) and a ChatML chat template, as Qwen's and OLMoE's releases have."""
    import torch
    import transformers

    prefix, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(rope_theta=1e6, **COMMON, **extra)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    with torch.no_grad():  # norms start at exactly 1.0: perturbed, a missed norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    config_file = path / "config.json"
    config_file.write_text(
        json.dumps(published_config(json.loads(config_file.read_text())), indent=2)
    )
    shutil.copy(mistral_tokenizer_file("v1"), path / "tokenizer.model")
    tok = transformers.LlamaTokenizer.from_pretrained(str(path), add_bos_token=False)
    (path / "tokenizer.model").unlink()  # a tokenizer.json, as Qwen and OLMoE ship
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_family(root / family, family) for family in FAMILIES}


def transformers_model(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def transformers_greedy(path, ids: list[int], n: int) -> list[int]:
    import torch

    model = transformers_model(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


def _reply(engine, prompt: str = PROMPT, n: int = TOKENS) -> tuple[str, list[int]]:
    ids = engine.prompt_ids(prompt=prompt)
    settings = GenerationSettings(max_tokens=n, temperature=0.0)
    text = "".join(c.text for c in engine.stream_text(prompt, settings))
    return text, engine.cache_state()[1][len(ids) :]


def assert_engine_is_transformers(engine: Engine, reference) -> tuple[list, np.ndarray, list]:
    """`engine`'s logits on PROMPT and its greedy text are transformers' on the checkpoint at
    `reference`; returns the prompt's ids, mixchat's logits and its greedy tokens."""
    import torch

    ids = engine.prompt_ids(prompt=PROMPT)
    with torch.no_grad():
        expected = transformers_model(reference)(torch.tensor([ids])).logits.float().numpy()
    logits = np.array(engine.model(mx.array([ids])))
    np.testing.assert_allclose(logits, expected, atol=2e-4 * np.abs(expected).max())
    text, tokens = _reply(engine)
    greedy = transformers_greedy(reference, ids, TOKENS)
    assert tokens == greedy[: len(tokens)] and len(tokens) >= TOKENS - 1
    assert text == engine.tokenizer.decode(greedy[: len(tokens) + 1])
    return ids, logits, tokens


def assert_transformers_logits_and_greedy_text(path, family: str) -> None:
    """mixchat's logits and greedy text on the checkpoint at `path` are transformers'; the
    experts panel's counts: each of the 2 MoE layers routed each token to 2 of 8 experts."""
    engine = Engine.load(str(path))
    assert engine.info.architecture == family and engine.info.num_experts == 8
    _, _, tokens = assert_engine_is_transformers(engine, path)
    assert engine.last_routing.shape == (2, 8)
    assert (engine.last_routing.sum(axis=1) == 2 * len(tokens) + 2).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_text_are_transformers(family_dirs, family):
    assert_transformers_logits_and_greedy_text(family_dirs[family], family)


def test_ask_raw_prints_transformers_greedy_text(family_dirs):
    path = family_dirs["qwen3_moe"]
    result = mixchat("ask", "--raw", "--model", str(path), "--temp", "0", "--max-tokens",
                     str(TOKENS), "--json", PROMPT)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    engine = Engine.load(str(path))
    ids = engine.prompt_ids(prompt=PROMPT)
    reference = transformers_greedy(path, ids, TOKENS)
    assert json.loads(result.stdout)["text"] == engine.tokenizer.decode(reference)


def test_chat_uses_the_model_template(family_dirs):
    import transformers

    path = family_dirs["qwen3_moe"]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Where is Paris?"}]  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(path)
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=False)  # fmt: skip
    engine = Engine.load(str(path))
    assert engine.has_chat_template and engine.prompt_ids(messages) == expected
    reply = "".join(
        c.text for c in engine.stream(messages, GenerationSettings(max_tokens=4, temperature=0.0))
    )
    assert reply


def test_mlx_community_4bit_directory_runs_as_mlx_lm(family_dirs, tmp_path_factory):
    """An `mlx_lm.convert -q` of the published layout (mlx-community's 4-bit releases): the
    same greedy tokens as mlx-lm's own generation."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    out = tmp_path_factory.mktemp("q3-4bit") / "m"
    mlx_lm.convert(
        str(family_dirs["qwen3_moe"]), str(out), quantize=True, q_bits=4, q_group_size=64
    )
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    engine = Engine.load(str(out))
    assert engine.info.quantization.startswith("4-bit")
    _, tokens = _reply(engine)
    model, tokenizer = mlx_lm.load(str(out))
    expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT,
                                                         max_tokens=TOKENS,
                                                         sampler=make_sampler(0.0))]  # fmt: skip
    assert tokens == expected[: len(tokens)] and len(tokens) >= TOKENS - 1
