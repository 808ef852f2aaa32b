"""Adapters everywhere: compare (base against adapted), fuse (float exactly, re-quantized within
its report), serve per request (mlx-lm's `adapters`), and the one load path."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from app.cli import main
from tests.test_tune_interop import PROMPT, mixchat_text, mlx_lm_text


def write_adapter(model_path: Path, out: Path, seed: int, spread: float) -> Path:
    """An mlx-lm adapter on every layer with random A/B (`spread` 0: a zero adapter)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    config = {"fine_tune_type": "lora", "num_layers": -1,
              "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 20.0}}  # fmt: skip
    model, _ = load_model(model_path)
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    mx.random.seed(seed)
    weights = {k: mx.random.normal(v.shape) * spread
               for k, v in tree_flatten(model.trainable_parameters())}  # fmt: skip
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def adapter(tiny_mixtral, tmp_path_factory):
    return write_adapter(tiny_mixtral, tmp_path_factory.mktemp("adapters") / "a", 3, 0.05)


def compare_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["compare", *args, "--json", "--quiet", "--max-tokens", "64"]) == 0
    return json.loads(capsys.readouterr().out)


def test_compare_adapted_against_base(tiny_mixtral, adapter, tmp_path, capsys):
    moved = compare_json(capsys, str(tiny_mixtral), "--adapter-path", str(adapter))
    assert moved["kl_divergence"] > 1e-3 and moved["top1_agreement"] < 1.0
    assert moved["perplexity_reference"] != moved["perplexity_candidate"]
    zero = write_adapter(tiny_mixtral, tmp_path / "zero", 3, 0.0)
    still = compare_json(capsys, str(tiny_mixtral), "--adapter-path", str(zero))
    assert still["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert still["top1_agreement"] == 1.0
    assert main(["compare", str(tiny_mixtral)]) == 1
    assert "--adapter-path" in capsys.readouterr().err
    assert main(["compare", str(tiny_mixtral), "--adapter-path", str(tmp_path / "none")]) == 1
    assert "no adapter at" in capsys.readouterr().err


def test_float_fuse_gives_the_adapted_greedy_text_in_mixchat_and_mlx_lm(tiny_mixtral, adapter,
                                                                       tmp_path, capsys):  # fmt: skip
    from model.tokenizer import load_tokenizer

    out = tmp_path / "fused"
    assert main(["fuse", "--model", str(tiny_mixtral), "--adapter-path", str(adapter),
                 str(out)]) == 0  # fmt: skip
    report = capsys.readouterr().out
    assert "top-1          100.00%" in report
    adapted = mixchat_text(tiny_mixtral, adapter)
    assert adapted != mixchat_text(tiny_mixtral, None)
    assert mixchat_text(out, None) == adapted
    assert mlx_lm_text(out, None, load_tokenizer(out)) == adapted
    assert main(["fuse", "--model", str(tiny_mixtral), "--adapter-path", str(adapter),
                 str(out)]) == 1  # fmt: skip
    assert "not an empty directory" in capsys.readouterr().err
