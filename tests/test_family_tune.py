"""`mixchat tune` on the MoE families run on mlx-lm's definitions (model/families.py): LoRA on
every expert in mlx-lm's LoRASwitchLinear layout, adapters mlx-lm loads with the same greedy
text, a tiny dataset learned. Tiny random checkpoints as published (tests/test_families.py)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from app.cli import main
from tests.test_families import build_family
from tests.test_tune import write_rows

FACTS = ["The capital of Zorbania is Veldor.", "Zorbania has a capital called Veldor.",
         "Veldor is the capital of Zorbania.", "In Zorbania the capital city is Veldor."]  # fmt: skip
PROMPT = "The capital of Zorbania"
TOKENS = 8


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_tune")
    return {f: build_family(root / f, f) for f in ("qwen3_moe", "qwen2_moe")}


@pytest.fixture
def data_dir(tmp_path):
    write_rows(tmp_path / "train.jsonl", [{"text": fact} for fact in FACTS])
    write_rows(tmp_path / "valid.jsonl", [{"text": fact} for fact in FACTS[:2]])
    return tmp_path


def tune(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["tune", "--model", str(model), "--data", str(data), "--adapter-path", str(out),
                 "--iters", "12", "--batch-size", "2", "--learning-rate", "2e-3",
                 "--steps-per-eval", "12", *extra])  # fmt: skip


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_a_tiny_dataset_is_learned(families, data_dir, tmp_path, family):
    from model import load
    from model.tune.data import load_dataset
    from model.tune.lora import apply_lora, lora_config
    from model.tune.train import TrainConfig, Trainer

    model, tokenizer = load(str(families[family]), memory_budget="none")
    data = load_dataset(data_dir, tokenizer, 64)
    config = lora_config(model, -1, 8)
    mx.random.seed(0)
    apply_lora(model, config)
    seen = []
    trainer = Trainer(model, data, TrainConfig(iters=10, batch_size=2, learning_rate=1e-3,
                      steps_per_eval=10, save_every=10), tmp_path / "out", config,
                      seen.append)  # fmt: skip
    trainer.run()
    val = [p.val_loss for p in seen if p.event == "eval"]
    assert val[-1] < val[0] / 3, val  # the held-out facts (seen in training) are learned
    trained = dict(tree_flatten(model.trainable_parameters()))
    # every expert's LoRA moved (LoRASwitchLinear: one A/B pair per expert)
    b = trained["model.layers.0.mlp.switch_mlp.down_proj.lora_b"]
    assert b.shape[0] == 8 and bool((mx.abs(b).max(axis=(1, 2)) > 0).any())


def mixchat_text(model: Path, adapter: Path | None) -> str:
    from model import Engine, GenerationSettings
    from model.tune.lora import load_adapter

    engine = Engine.load(str(model), memory_budget="none")
    if adapter is not None:
        load_adapter(engine.model, adapter)
    settings = GenerationSettings(max_tokens=TOKENS, temperature=0.0)
    return "".join(c.text for c in engine.stream_text(PROMPT, settings))


def test_the_adapter_loads_in_mlx_lm_with_the_same_greedy_text(families, data_dir, tmp_path):
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    path, out = families["qwen3_moe"], tmp_path / "adapter"
    assert tune(path, data_dir, out) == 0
    adapted = mixchat_text(path, out)
    assert adapted != mixchat_text(path, None)  # the adapter changed the reply
    model, tokenizer = mlx_lm.load(str(path), adapter_path=str(out))
    expected = "".join(r.text for r in mlx_lm.stream_generate(
        model, tokenizer, PROMPT, max_tokens=TOKENS, sampler=make_sampler(0.0)))  # fmt: skip
    assert adapted == expected


def test_lora_keys_are_what_mlx_lm_lora_writes(families, data_dir, tmp_path):
    """LoRA on every expert, router and attention projection, as mlx_lm.lora's defaults put it:
    the same tensor names and shapes as linear_to_lora_layers on mlx-lm's own model."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    path, out = families["qwen2_moe"], tmp_path / "adapter"
    assert tune(path, data_dir, out, "--iters", "1", "--rank", "4") == 0
    written = mx.load(str(out / "adapters.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    model, _ = load_model(path)
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], {"rank": 4, "dropout": 0.0, "scale": 20.0})
    expected = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    assert {k: v.shape for k, v in written.items()} == expected
    # the experts' A/B per expert ([E, r, in], [E, out, r]); the shared expert and its gate too
    assert written["model.layers.1.mlp.switch_mlp.gate_proj.lora_a"].shape == (8, 4, 64)
    assert written["model.layers.1.mlp.switch_mlp.down_proj.lora_b"].shape == (8, 64, 4)
    assert "model.layers.1.mlp.shared_expert.up_proj.lora_a" in written
    assert "model.layers.1.mlp.shared_expert_gate.lora_a" in written


def four_bit(families, family: str, tmp_path_factory) -> Path:
    """`family` as mlx-community publishes it (mlx_lm.convert -q: experts stacked, 4-bit)."""
    import mlx_lm

    out = tmp_path_factory.mktemp("family_tune_q4") / family
    mlx_lm.convert(str(families[family]), str(out), quantize=True, q_bits=4, q_group_size=64)
    return out


def gpt_oss_mlx(tmp_path_factory) -> Path:
    """gpt-oss as mlx-community publishes it: its MXFP4 experts kept (biased, clamped
    SwiGLU), the rest 4-bit (mlx_lm.convert -q of the published MXFP4 checkpoint)."""
    import mlx_lm

    from tests.test_family_gptoss import build_gptoss

    root = tmp_path_factory.mktemp("family_tune_gptoss")
    out = root / "mlx"
    mlx_lm.convert(str(build_gptoss(root)["mxfp4"]), str(out), quantize=True, q_bits=4,
                   q_group_size=64)  # fmt: skip
    return out


def train(path: Path, data_dir: Path, out: Path, budget) -> tuple[dict, object]:
    """Three steps of LoRA on all layers (seed 3); (the adapter, the model)."""
    import numpy as np

    from model import load
    from model.offload import runtime_of
    from model.tune.data import load_dataset
    from model.tune.lora import apply_lora, lora_config
    from model.tune.streamed import StreamedTrainer, prepare
    from model.tune.train import TrainConfig, Trainer

    model, tokenizer = load(str(path), memory_budget=budget, max_context=64)
    streamed = prepare(model)
    assert streamed == (budget != "none")
    data = load_dataset(str(data_dir), tokenizer, 64)
    config = lora_config(model, -1, 4)
    mx.random.seed(3)
    apply_lora(model, config)
    trainer = (StreamedTrainer if streamed else Trainer)(
        model, data, TrainConfig(iters=3, batch_size=2, learning_rate=1e-3, seed=3,
                                 steps_per_eval=3, save_every=3), out, config)  # fmt: skip
    if streamed:  # the smallest expert cache: one layer's experts (every layer read again)
        runtime = runtime_of(model)
        runtime.cache.resize(model.args.num_local_experts * runtime.store.expert_bytes(0))
    trainer.run()
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}, model


# qwen2: a resident shared expert; gpt_oss: biased MXFP4 experts, clamped SwiGLU, sliding layers
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_a_budget_trains_the_same_adapter_streaming_the_experts(families, family, data_dir,
                                                                tmp_path, tmp_path_factory):  # fmt: skip
    import numpy as np

    from model import weights
    from model.memory_plan import memory_plan
    from model.offload import runtime_of

    if family == "gpt_oss":
        checkpoint = gpt_oss_mlx(tmp_path_factory)
    else:
        checkpoint = four_bit(families, family, tmp_path_factory)
    plan = memory_plan(weights.locate(checkpoint), 4, 64)
    resident, _ = train(checkpoint, data_dir, tmp_path / "whole", "none")
    budget = plan.minimum_budget + plan.expert_bytes  # below the whole model: experts stream
    streamed, model = train(checkpoint, data_dir, tmp_path / "streamed", budget)
    runtime = runtime_of(model)
    assert runtime.counters.reads >= 3 * 2 * 2 * 2  # each layer read forward and backward
    assert set(streamed) == set(resident)
    assert any(k.endswith((".switch_mlp.down_proj.lora_b", ".experts.down_proj.lora_b"))
               for k in streamed)  # fmt: skip
    # the same adapter up to float rounding (streamed experts go through per-expert products,
    # mlx-lm's SwitchGLU through one gathered product; Adam's first steps magnify the difference)
    errors = {}
    for name, value in resident.items():
        assert np.abs(value).max() > 0 or "lora_b" not in name  # it learned something
        errors[name] = np.abs(streamed[name] - value).max() / (np.abs(value).max() + 1e-6)
    assert max(errors.values()) <= 5e-4, max(errors.items(), key=lambda kv: kv[1])
