"""The guard-model guard: Meta's prompt (llama-cookbook) and first-token scoring on a tiny
Llama-shaped model whose LM head prefers each label."""

from __future__ import annotations

import numpy as np
import pytest
from llama_cookbook.inference import prompt_format_utils as pfu  # Makefile: --no-deps

from app.moderation.llama_guard import LlamaGuard, build_prompt
from model.errors import MixchatError


def test_prompt_equals_llama_cookbooks_for_a_user_turn():
    text = "How do I make a cake? It's for $5 and 100% {fun}"
    expected = pfu.build_default_prompt(
        pfu.AgentType.USER, [pfu.ConversationTurn(text, pfu.AgentType.USER)],
        pfu.LlamaGuardVersion.LLAMA_GUARD_3,
    )  # fmt: skip
    assert build_prompt([{"role": "user", "content": text}]) == expected


def test_prompt_equals_llama_cookbooks_for_an_agent_turn():
    turns = ["Whats the color of the sky?", "The sky is blue.\n\nAlways."]
    expected = pfu.build_default_prompt(
        pfu.AgentType.AGENT, pfu.create_conversation(turns), pfu.LlamaGuardVersion.LLAMA_GUARD_3
    )
    conversation = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": turns[1]}]
    assert build_prompt(conversation) == expected


SAFE, UNSAFE, NEWLINE, S, ONE, EOS = 5023, 15426, 13, 28735, 28740, 2  # Mistral v1 pieces


def guard_checkpoint(base, path, label: int):
    """`base` (a tiny random Mistral, Llama-shaped) with its layers' outputs zeroed, so the
    last hidden state is the last token's embedding, and a head set to answer `label` after
    any prompt, then "\\nS1" and the end after "unsafe"."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(base, path)
    weights = load_file(path / "model.safetensors")
    hidden = weights["model.norm.weight"].shape[0]
    embed = np.zeros_like(weights["model.embed_tokens.weight"])
    embed[:, 0] = 1.0  # every token: state 0
    head = np.zeros_like(weights["lm_head.weight"])
    head[label, 0] = 10.0  # after the prompt: the label
    for state, (token, after) in enumerate(((UNSAFE, NEWLINE), (NEWLINE, S), (S, ONE), (ONE, EOS)), 1):
        embed[token] = 0.0
        embed[token, state] = 1.0
        head[after, state] = 10.0
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = np.zeros_like(weights[name])
        elif name.endswith("norm.weight"):
            weights[name] = np.ones(hidden, weights[name].dtype)
    weights["model.embed_tokens.weight"], weights["lm_head.weight"] = embed, head
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def guards(tmp_path_factory):
    from model import Engine
    from tests.checkpoints import build_hf_checkpoint

    root = tmp_path_factory.mktemp("guards")
    base = build_hf_checkpoint(root / "base", "mistral", num_layers=1, seed=3)
    loaded = {
        label: LlamaGuard(Engine.load(str(guard_checkpoint(base, root / label, token))))
        for label, token in (("safe", SAFE), ("unsafe", UNSAFE))
    }
    return {**loaded, "base": base}


def test_a_head_preferring_safe_passes_the_text(guards):
    result = guards["safe"].check("I will kill you.")
    assert not result.flagged and result.guard == "llama-guard"
    assert max(result.category_scores.values()) == 0.0


def test_a_head_preferring_unsafe_flags_the_category_line(guards):
    result = guards["unsafe"].check("Hello there.", role="assistant",
                                    context=[{"role": "user", "content": "Hi"}])  # fmt: skip
    assert result.flagged and result.flagged_categories == ["violence_and_threats"]  # S1
    assert result.category_scores["violence_and_threats"] > 0.99


def test_a_model_that_is_not_a_guard_is_one_line(tiny_mixtral):
    from model import Engine

    with pytest.raises(MixchatError, match="not a Llama Guard model") as err:
        LlamaGuard(Engine.load(str(tiny_mixtral)))
    assert "\n" not in str(err.value)



def test_self_check_answers_with_the_label_the_model_prefers(tmp_path, guards):
    from app.moderation.self_check import SelfCheck
    from model import Engine

    assert not SelfCheck(guards["safe"].engine).check("I will kill you.").flagged
    violence = SelfCheck(guards["safe"].engine).labels["violence"][0]
    engine = Engine.load(str(guard_checkpoint(guards["base"], tmp_path / "violent", violence)))
    result = SelfCheck(engine).check("What a nice day.")
    assert result.flagged_categories == ["violence_and_threats"] and result.guard == "self-check"
