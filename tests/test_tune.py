"""mixchat tune: data encoding and masks, LoRA gradients and losses against mlx-lm's own model
and loss, exact resumption, and every bad input (one line, exit 1 or 2)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from app.cli import main
from model.tune.data import DataError, encode_row, load_dataset

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    }  # fmt: skip
    for i in range(8)
]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_mixtral):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_mixtral)


@pytest.fixture
def data_dir(tmp_path):
    write_rows(tmp_path / "train.jsonl", CHATS)
    write_rows(tmp_path / "valid.jsonl", CHATS[:2])
    return tmp_path


def learned_text(row, tokenizer) -> str:
    return tokenizer.decode([i for i, w in zip(row.ids, row.weights) if w])


# --- data -------------------------------------------------------------------------------------


def test_chat_is_encoded_as_for_inference_and_only_the_reply_is_learned(tokenizer):
    row = encode_row(CHATS[3], tokenizer)
    prompt = tokenizer.encode_chat(CHATS[3]["messages"][:1])
    assert row.ids[: len(prompt)] == prompt
    assert row.ids[-1] == tokenizer.eos_id
    assert row.weights == [0] * len(prompt) + [1] * (len(row.ids) - len(prompt))
    assert learned_text(row, tokenizer) == "It is 6."


def test_multi_turn_weight_zero_and_no_mask_prompt(tokenizer):
    chat = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Skip me", "weight": 0},
        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Learn me"},
    ]}  # fmt: skip
    row = encode_row(chat, tokenizer)
    full = tokenizer.encode_chat(chat["messages"] + [{"role": "user", "content": "x"}])
    assert full[: len(row.ids)] == row.ids  # the chat's tokens, exactly as inference has them
    assert learned_text(row, tokenizer) == "Learn me"
    everything = encode_row(chat, tokenizer, mask_prompt=False)
    assert everything.ids == row.ids and everything.weights == [0] + [1] * (len(row.ids) - 1)


def test_prompt_completion_and_text_rows(tokenizer):
    row = encode_row({"prompt": "Capital of France?", "completion": "Paris."}, tokenizer)
    assert learned_text(row, tokenizer) == "Paris."
    text = encode_row({"text": "Bonjour le monde"}, tokenizer)
    assert text.ids[0] == tokenizer.bos_id and text.ids[-1] == tokenizer.eos_id
    assert text.weights == [0] + [1] * (len(text.ids) - 1)


def test_default_model_chat_template_masks(default_model_path):
    from model.tokenizer import load_tokenizer
    from model.weights import locate

    tok = load_tokenizer(locate(default_model_path).gguf_metadata)
    row = encode_row(CHATS[2], tok)
    assert learned_text(row, tok) == "It is 4."
    assert row.ids[-1] in tok.eos_ids


def test_layouts_and_truncation(tmp_path, tokenizer):
    single = write_rows(tmp_path / "one.jsonl", CHATS)
    assert len(load_dataset(single, tokenizer, 2048).train.rows) == 8
    data = load_dataset(write_rows(tmp_path / "long.jsonl", CHATS), tokenizer, 18)
    assert data.train.truncated == 8 and all(len(r.ids) == 18 for r in data.train.rows)
    assert data.warnings(18) == ["8 rows longer than --max-seq-length 18 tokens were truncated"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "bad.jsonl:2: "),
        ('{"foo": 1}', 'bad.jsonl:2: a row needs "messages"'),
        ('[1, 2]', "bad.jsonl:2: expected a JSON object"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "bad.jsonl:2: message 0 has role"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "bad.jsonl:2: the chat has no assistant"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", '
         '"weight": 2}]}', "bad.jsonl:2: message 1: weight must be 0 or 1"),
        ('{"prompt": "x"}', 'bad.jsonl:2: "prompt" and "completion"'),
        ('{"text": 3}', 'bad.jsonl:2: "text" must be'),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], '
         '"tools": [{"type": "function"}]}',
         "bad.jsonl:2: Mistral's v1 tokenizer has no tool tokens"),
    ],
)  # fmt: skip
def test_malformed_row_names_file_and_line(tmp_path, tokenizer, line, message):
    path = write_rows(tmp_path / "bad.jsonl", [CHATS[0], line])
    with pytest.raises(DataError) as e:
        load_dataset(path, tokenizer, 2048)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_nothing_to_learn_and_missing_layouts_are_refused(tmp_path, tokenizer):
    skipped = {"messages": [{"role": "user", "content": "x"},
                            {"role": "assistant", "content": "y", "weight": 0}]}  # fmt: skip
    with pytest.raises(DataError, match="nothing to learn"):
        load_dataset(write_rows(tmp_path / "zero.jsonl", [skipped]), tokenizer, 2048)
    with pytest.raises(DataError, match="has no rows"):
        load_dataset(write_rows(tmp_path / "empty.jsonl", [""]), tokenizer, 2048)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="has no train.jsonl"):
        load_dataset(tmp_path / "folder", tokenizer, 2048)


# --- LoRA and the loss against mlx-lm's -------------------------------------------------------


def lora_models(path: Path):
    """mixchat's model and mlx-lm's own, with the same LoRA layers and the same LoRA weights
    (lora_b random too, so every gradient is non-trivial)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from model import load
    from model.tune.lora import apply_lora, lora_config

    ours, _ = load(str(path), memory_budget="none")
    config = lora_config(ours, -1, 4)
    mx.random.seed(3)
    apply_lora(ours, config)
    weights = {
        k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(ours.trainable_parameters())
    }
    ours.load_weights(list(weights.items()), strict=False)
    ref, _ = load_model(path)
    ref.freeze()
    linear_to_lora_layers(ref, config["num_layers"], config["lora_parameters"])
    ref.load_weights(list(weights.items()), strict=False)
    assert set(weights) == {k for k, _ in tree_flatten(ref.trainable_parameters())}
    return ours, ref


@pytest.mark.parametrize("route", ["mlx", "blas", "blas-and-gather"])
def test_loss_and_lora_gradients_match_mlx_lm(tiny_mixtral, tokenizer, route, monkeypatch):
    """Through MLX's kernels (tiny weights), and through the CPU's many-row route that training
    takes on real models: every product through numpy's BLAS, each expert's base weights
    dequantized once (with experts of few rows through the gather kernels: blas-and-gather)."""
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss

    from model import blas, experts
    from model.tune.train import loss_fn, pad

    calls = {"blas": 0, "gather": 0}
    if route != "mlx":
        monkeypatch.setattr(blas, "MIN_WEIGHTS", 1)
        monkeypatch.setattr(blas, "MIN_ROWS_SMALL", 4 if route == "blas" else 12)

        def count(name, f):
            return lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or f(*a, **k)

        monkeypatch.setattr(experts, "_lora_gathered", count("gather", experts._lora_gathered))
        monkeypatch.setattr(blas, "linear", count("blas", blas.linear))
    ours, ref = lora_models(tiny_mixtral)
    rows = [encode_row(c, tokenizer) for c in CHATS[:3]]
    inputs, targets, mask = pad(rows)
    (loss, ntoks), grads = nn.value_and_grad(ours, loss_fn)(ours, inputs, targets, mask)
    batch = mx.concatenate([inputs, targets[:, -1:]], axis=1)
    lengths = mx.array([[r.weights.index(1), len(r.ids) - 1] for r in rows])
    (ref_loss, ref_ntoks), ref_grads = nn.value_and_grad(ref, default_loss)(ref, batch, lengths)
    assert ntoks.item() == ref_ntoks.item() > 0
    assert abs(loss.item() - ref_loss.item()) < 1e-4 * abs(ref_loss.item())
    ours_flat, ref_flat = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    assert set(ours_flat) == set(ref_flat)
    assert any("switch_mlp.gate_proj.lora_a" in k for k in ours_flat)  # one pair per expert
    for name, g in ours_flat.items():
        r = np.array(ref_flat[name])
        assert np.abs(np.array(g) - r).max() <= 1e-3 * (np.abs(r).max() + 1e-6), name
    if route != "mlx":  # the experts' rows went the way the route says
        assert calls["blas"] > 0 and (calls["gather"] > 0) == (route == "blas-and-gather")


# --- the command ------------------------------------------------------------------------------


def tune(*args: str) -> int:
    return main(["tune", *args])


def adapter(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


def test_resume_continues_exactly(tiny_mixtral, data_dir, tmp_path):
    common = ["--model", str(tiny_mixtral), "--data", str(data_dir), "--learning-rate", "1e-3",
              "--batch-size", "2", "--save-every", "2", "--steps-per-eval", "3"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert tune(*common, "--adapter-path", str(straight), "--iters", "6") == 0
    assert tune(*common, "--adapter-path", str(stopped), "--iters", "3") == 0
    assert tune(*common, "--adapter-path", str(stopped), "--iters", "6", "--resume") == 0
    a, b = adapter(straight), adapter(stopped)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    fresh = tmp_path / "fresh"
    assert tune(*common, "--adapter-path", str(fresh), "--iters", "3") == 0
    assert any(not np.array_equal(a[k], adapter(fresh)[k]) for k in a)  # 3 steps != 6 steps
    config = json.loads((straight / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"]["rank"] == 8


def test_ctrl_c_says_how_to_resume_and_resume_continues(tiny_mixtral, data_dir, tmp_path,
                                                        capsys, monkeypatch):  # fmt: skip
    from model.tune import train

    common = ["--model", str(tiny_mixtral), "--data", str(data_dir), "--learning-rate", "1e-3",
              "--batch-size", "2", "--save-every", "2", "--iters", "4"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert tune(*common, "--adapter-path", str(straight)) == 0
    step = train.Trainer.train_step

    def ctrl_c_at_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(train.Trainer, "train_step", ctrl_c_at_step_3)
    capsys.readouterr()
    assert tune(*common, "--adapter-path", str(stopped)) == 130
    err = capsys.readouterr().err
    assert f"stopped at step 3; {stopped} holds the save of step 2" in err and "--resume" in err
    assert "Traceback" not in err
    monkeypatch.setattr(train.Trainer, "train_step", step)
    assert tune(*common, "--adapter-path", str(stopped), "--resume") == 0
    a, b = adapter(straight), adapter(stopped)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert tune(*common, "--adapter-path", str(stopped), "--resume") == 0  # nothing left to do
    assert "already at step 4 of --iters 4: raise --iters" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--learning-rate", "0"], 2, "--learning-rate must be positive"),
        (["--num-layers", "0"], 2, "--num-layers must be -1"),
        (["--num-layers", "5"], 1, "--num-layers must be -1 (all) or 1 to 2"),
        (["--batch-size", "50"], 1, "fewer than --batch-size 50"),
        (["--iters", "0"], 2, "--iters 0 trains nothing: add --test"),
        (["--iters", "-1"], 2, "must be 0 or a positive integer"),
        (["--test"], 2, "--test needs a folder with test.jsonl"),
        (["--test", "--test-batches", "0"], 2, "--test-batches must be -1"),
        (["--resume"], 2, "--resume: no run saved"),
        (["--val-batches", "0"], 2, "--val-batches"),
    ],
)
def test_bad_arguments_are_one_line(tiny_mixtral, data_dir, tmp_path, capsys, extra, code, message):
    out = tmp_path / "never"
    args = ["--model", str(tiny_mixtral), "--data", str(data_dir), "--adapter-path", str(out)]
    assert tune(*args, *extra) == code
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_bad_data_and_resume_mismatch_are_one_line(tiny_mixtral, data_dir, tmp_path, capsys):
    bad = write_rows(tmp_path / "bad.jsonl", [CHATS[0], "{oops"])
    assert tune("--model", str(tiny_mixtral), "--data", str(bad)) == 1
    assert f"{bad}:2:" in capsys.readouterr().err
    assert tune("--model", str(tiny_mixtral), "--data", str(tmp_path / "none.jsonl")) == 2
    out = tmp_path / "run"
    args = ["--model", str(tiny_mixtral), "--data", str(data_dir), "--adapter-path", str(out)]
    assert tune(*args, "--iters", "1", "--batch-size", "2") == 0
    capsys.readouterr()
    assert tune(*args, "--iters", "2", "--batch-size", "4", "--resume") == 1
    err = capsys.readouterr().err.strip()
    assert "--resume needs the same run" in err and "batch_size" in err and "\n" not in err
    write_rows(data_dir / "train.jsonl", CHATS[::-1][:6])
    assert tune(*args, "--iters", "2", "--batch-size", "2", "--resume") == 1
    assert "the training data" in capsys.readouterr().err


def test_truncation_warns_once_with_the_count(tiny_mixtral, data_dir, tmp_path, capsys):
    args = ["--model", str(tiny_mixtral), "--data", str(data_dir), "--max-seq-length", "18",
            "--iters", "1", "--adapter-path", str(tmp_path / "a")]  # fmt: skip
    assert tune(*args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["mixchat: warning: 10 rows longer than --max-seq-length 18 tokens were "
                        "truncated"]  # fmt: skip


def test_qlora_on_4bit_weights_trains_only_the_adapter(tiny_mixtral, tokenizer, tmp_path):
    import mlx.nn as nn

    from model import load
    from model.tune.data import Dataset, Split
    from model.tune.lora import apply_lora, lora_config
    from model.tune.train import TrainConfig, Trainer

    model, _ = load(str(tiny_mixtral), memory_budget="none")
    nn.quantize(model, group_size=32, bits=4)
    experts = model.layers[0].block_sparse_moe.switch_mlp
    assert type(experts.gate_proj).__name__ == "QuantizedSwitchLinear"
    base = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    config = lora_config(model, -1, 4)
    mx.random.seed(1)
    apply_lora(model, config)
    rows = [encode_row(c, tokenizer) for c in CHATS]
    data = Dataset(Split(tmp_path / "train.jsonl", rows), Split(tmp_path / "valid.jsonl", rows[:4]))
    reports = []
    train = TrainConfig(iters=6, batch_size=4, learning_rate=3e-3, steps_per_eval=6)
    Trainer(model, data, train, tmp_path / "out", config, reports.append).run()
    val = [p.val_loss for p in reports if p.event == "eval"]
    assert val[-1] < 0.5 * val[0]
    after = dict(tree_flatten(model.parameters()))
    for name, value in base.items():  # the base stays frozen: "x.weight" is now "x.linear.weight"
        moved = (
            name if name in after else name.rsplit(".", 1)[0] + ".linear." + name.rsplit(".", 1)[1]
        )
        assert np.array_equal(np.array(after[moved]), value), name
    saved = mx.load(str(tmp_path / "out" / "adapters.safetensors"))
    assert saved["model.layers.1.block_sparse_moe.switch_mlp.up_proj.lora_a"].shape == (4, 4, 64)


def test_seed_decides_the_run(tiny_mixtral, data_dir, tmp_path):
    common = ["--model", str(tiny_mixtral), "--data", str(data_dir), "--iters", "2"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert tune(*common, "--seed", seed, "--adapter-path", str(tmp_path / name)) == 0
    a, b, c = (adapter(tmp_path / name) for name in "abc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_a_crash_loses_at_most_one_save_interval(tiny_mixtral, tokenizer, tmp_path):
    from model import load
    from model.tune.data import Dataset, Split
    from model.tune.lora import adapter_weights, apply_lora, lora_config
    from model.tune.train import TrainConfig, Trainer

    rows = [encode_row(c, tokenizer) for c in CHATS]
    train = TrainConfig(iters=7, batch_size=2, learning_rate=1e-3, save_every=2)

    def trainer(out: Path, report=None) -> Trainer:
        model, _ = load(str(tiny_mixtral), memory_budget="none")
        config = lora_config(model, -1, 4)
        mx.random.seed(0)
        apply_lora(model, config)
        return Trainer(model, Dataset(Split(tmp_path / "t", rows)), train, out, config, report)

    straight = trainer(tmp_path / "straight")
    straight.run()

    def crash(progress) -> None:
        if progress.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "crashed", crash).run()
    resumed = trainer(tmp_path / "crashed")
    resumed.load_state()
    assert resumed.step == 4  # the last save before the crash
    resumed.run(resume=True)
    a, b = adapter_weights(straight.model), adapter_weights(resumed.model)
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_lora_layers_do_not_import_transformers_or_torch(tiny_mixtral):
    """apply_lora uses mlx-lm's LoRA layers without mlx_lm.tuner.utils, whose imports
    (transformers, torch) were ~0.3 GB of a training process's memory (BENCHMARKS.md)."""
    import subprocess
    import sys

    code = ("import sys; from model import load; from model.tune.lora import apply_lora, "
            f"lora_config; m, _ = load({str(tiny_mixtral)!r}, memory_budget='none'); "
            "before = {n.split('.')[0] for n in sys.modules}; apply_lora(m, lora_config(m, -1, 4)); "
            "new = {n.split('.')[0] for n in sys.modules} - before; "
            "print(sorted(new & {'torch', 'transformers'}), 'lora_a' in m.layers[0].block_sparse_moe.switch_mlp.gate_proj)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[] True"
