"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers, which
loads the same GGUF (dequantized to float32, Q/K rows un-permuted for its rotate-half RoPE)."""

from __future__ import annotations

import numpy as np
import pytest

from model import Engine, GenerationSettings, load
from tests.checkpoints import quick_gguf_reads

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def reference(default_model_path, hf_gguf):
    """transformers' model and tokenizer (the session's), both from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    directory, name = str(default_model_path.parent), default_model_path.name
    with quick_gguf_reads():
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval(), hf_gguf


def test_logits_match_transformers_on_the_gguf(default_model_path, reference):
    import mlx.core as mx
    import torch

    ref_model, ref_tokenizer = reference
    model, tokenizer = load(None)
    ids = tokenizer.encode_chat(QUESTION)
    assert ids == list(ref_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                                         tokenize=True, return_dict=False))
    ours = np.array(model(mx.array([ids])))
    with torch.no_grad():
        theirs = ref_model(torch.tensor([ids])).logits.numpy()
    assert np.abs(ours - theirs).max() <= 2e-3 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() == 1.0


def test_greedy_answer_is_paris_like_transformers(reference):
    import torch

    ref_model, ref_tokenizer = reference
    engine = Engine.load(None)
    chunks = list(engine.stream(QUESTION, GenerationSettings(max_tokens=16, temperature=0.0)))
    text = "".join(c.text for c in chunks)
    prompt = engine.tokenizer.encode_chat(QUESTION)
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    expected = ref_tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    assert "Paris" in text
    assert text == expected.strip() or text == expected
    assert chunks[-1].stats.finish_reason == "stop"
