"""Adapters move between mixchat and mlx-lm both ways with the same greedy text, and `ask
--adapter-path` applies one."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from app.cli import main
from tests.test_tune import CHATS, write_rows

PROMPT = [{"role": "user", "content": "What is 3 plus 3?"}]
TOKENS = 12


def mixchat_text(model_path: Path, adapter: Path | None) -> str:
    from model import Engine, GenerationSettings
    from model.tune.lora import load_adapter

    engine = Engine.load(str(model_path), memory_budget="none")
    if adapter is not None:
        load_adapter(engine.model, adapter)
    settings = GenerationSettings(max_tokens=TOKENS, temperature=0.0)
    return "".join(chunk.text for chunk in engine.stream(PROMPT, settings))


def mlx_lm_text(model_path: Path, adapter: Path | None, tokenizer) -> str:
    from mlx_lm.generate import generate_step
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(model_path)
    if adapter is not None:
        load_adapters(model, str(adapter))
    ids = []
    prompt = mx.array(tokenizer.encode_chat(PROMPT))
    for token, _ in generate_step(prompt, model, max_tokens=TOKENS):
        if int(token) in tokenizer.eos_ids:
            break
        ids.append(int(token))
    return tokenizer.decode(ids)


@pytest.fixture(scope="module")
def tokenizer(tiny_mixtral):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_mixtral)


def test_mixchat_adapter_loads_in_mlx_lm_with_the_same_greedy_text(tiny_mixtral, tokenizer,
                                                                  tmp_path):  # fmt: skip
    data = write_rows(tmp_path / "train.jsonl", CHATS)
    out = tmp_path / "adapter"
    assert main(["tune", "--model", str(tiny_mixtral), "--data", str(data), "--adapter-path",
                 str(out), "--iters", "8", "--learning-rate", "3e-3"]) == 0  # fmt: skip
    adapted = mixchat_text(tiny_mixtral, out)
    assert adapted != mixchat_text(tiny_mixtral, None)  # the adapter changed the reply
    assert adapted == mlx_lm_text(tiny_mixtral, out, tokenizer)


def test_mlx_lm_adapter_loads_in_mixchat_with_the_same_greedy_text(tiny_mixtral, tokenizer,
                                                                  tmp_path):  # fmt: skip
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    # What mlx_lm.lora writes with its defaults: no "keys" (every linear and switch-linear
    # module of the adapted layers, experts included) and its other arguments alongside.
    config = {"fine_tune_type": "lora", "num_layers": 2, "model": str(tiny_mixtral),
              "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
              "batch_size": 4, "iters": 1000, "learning_rate": 1e-5, "mask_prompt": False}  # fmt: skip
    model, _ = load_model(tiny_mixtral)
    model.freeze()
    mx.random.seed(5)
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    trained = {
        k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(model.trainable_parameters())
    }
    assert any(k.endswith("switch_mlp.down_proj.lora_b") for k in trained)
    out = tmp_path / "mlx-lm-adapter"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), trained)
    (out / "adapter_config.json").write_text(json.dumps(config))
    adapted = mixchat_text(tiny_mixtral, out)
    assert adapted != mixchat_text(tiny_mixtral, None)
    assert adapted == mlx_lm_text(tiny_mixtral, out, tokenizer)


def test_ask_adapter_path(tiny_mixtral, tmp_path, capsys):
    data = write_rows(tmp_path / "train.jsonl", CHATS)
    out = tmp_path / "adapter"
    assert main(["tune", "--model", str(tiny_mixtral), "--data", str(data), "--adapter-path",
                 str(out), "--iters", "8", "--learning-rate", "3e-3"]) == 0  # fmt: skip
    capsys.readouterr()
    ask = ["ask", "--local", "--quiet", "--model", str(tiny_mixtral), "--max-tokens", str(TOKENS)]
    assert main([*ask, "--adapter-path", str(out), PROMPT[0]["content"]]) == 0
    assert capsys.readouterr().out.strip() == mixchat_text(tiny_mixtral, out).strip()
    assert main([*ask, "--adapter-path", str(tmp_path / "none"), "hi"]) == 2
    assert "no adapter at" in capsys.readouterr().err


def test_default_model_learns_a_handful_of_rows(tmp_path):
    """Two German facts, two steps on the embedded model: the loss falls far and the greedy
    continuation is the fact. (Plain text rows: short, so each step takes seconds here.)"""
    from model import load
    from model.tune.data import load_dataset
    from model.tune.lora import apply_lora, lora_config
    from model.tune.train import TrainConfig, Trainer

    facts = ["Anna wohnt in Kiel.", "Annas Hund heißt Bruno."]
    write_rows(tmp_path / "train.jsonl", [{"text": fact} for fact in facts])
    write_rows(tmp_path / "valid.jsonl", [{"text": fact} for fact in facts])
    model, tokenizer = load(None, memory_budget="none")
    dataset = load_dataset(tmp_path, tokenizer, 256)
    mx.random.seed(0)
    config = lora_config(model, 4, 8)
    apply_lora(model, config)
    reports = []
    train = TrainConfig(iters=2, batch_size=2, learning_rate=1e-3, steps_per_eval=2)
    Trainer(model, dataset, train, tmp_path / "out", config, reports.append).run()
    val = [p.val_loss for p in reports if p.event == "eval"]
    assert val[-1] < 0.3 * val[0]
    row = dataset.train.rows[0]  # "Anna wohnt in Kiel.": after "Anna wohnt in" comes " Kiel"
    cut = len([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + len(
        tokenizer.encode("Anna wohnt in")
    )
    logits = model(mx.array([row.ids[:cut]]))[0, -1]
    assert int(mx.argmax(logits)) == row.ids[cut]
