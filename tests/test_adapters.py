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


def test_serve_applies_the_adapter_per_request_and_server_wide(tiny_mixtral, adapter, tmp_path,
                                                               capsys, monkeypatch):  # fmt: skip
    from app.serve.models import ModelManager
    from app.serve.scheduler import Scheduler
    from app.serve.server import ServerThread
    from model.load_options import LoadOptions
    from tests.test_serve import chat, health, post

    adapted, base = mixchat_text(tiny_mixtral, adapter), mixchat_text(tiny_mixtral, None)
    assert adapted != base
    models = ModelManager(str(tiny_mixtral), keep_alive=None,
                          load_options=LoadOptions(adapter_path=str(adapter)))  # fmt: skip
    with ServerThread(Scheduler(models, batch=None)) as server:

        def text(**body) -> str:
            reply = chat(server, PROMPT, max_tokens=12, extra_body=body)
            return reply.choices[0].message.content

        assert text() == adapted  # serve --adapter-path: the server-wide adapter
        assert text(adapters="") == base  # mlx-lm's per-request field: here none
        assert text(adapters=str(adapter)) == adapted
        assert health(server)["loads"] == 1  # the adapter swapped in place, no reload
        status, error = post(server, "/v1/chat/completions", json.dumps(
            {"messages": PROMPT, "adapters": str(tmp_path / "none")}).encode())  # fmt: skip
        assert status == 404 and "no adapter at" in error["error"]["message"]
        status, error = post(server, "/v1/chat/completions", json.dumps(
            {"messages": PROMPT, "adapters": 3}).encode())  # fmt: skip
        assert status == 400 and error["error"]["param"] == "adapters"

        # `ask --adapter-path` through the server: it sends the adapter instead of loading
        monkeypatch.setenv("MIXCHAT_SERVER", server.url)
        capsys.readouterr()
        jobs = len(server.scheduler.history)
        ask = ["ask", "--json", "--max-tokens", "12", "-m", str(tiny_mixtral)]
        assert main([*ask, "--adapter-path", str(adapter), PROMPT[0]["content"]]) == 0
        assert json.loads(capsys.readouterr().out)["text"] == adapted
        assert len(server.scheduler.history) == jobs + 1  # the server answered


@pytest.mark.anyio
async def test_chat_settings_screen_shows_and_changes_the_adapter(tiny_mixtral, adapter,
                                                                  tmp_path):  # fmt: skip
    from textual.widgets import Input

    from app.tui.screens.settings import SettingsScreen
    from model import Engine, GenerationSettings
    from tests.test_tui_helpers import TERMINAL_SIZE, make_app, screen_text, wait_for

    engine = Engine.load(str(tiny_mixtral), memory_budget="none")
    greedy = GenerationSettings(max_tokens=12, temperature=0.0)

    def text() -> str:
        return "".join(chunk.text for chunk in engine.stream(PROMPT, greedy))

    base, adapted = text(), mixchat_text(tiny_mixtral, adapter)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:

        async def settings() -> SettingsScreen:
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
            return app.screen

        dialog = await settings()
        field = dialog.query_one("#adapter-path", Input)
        assert field.value == ""
        field.value = str(tmp_path / "none")  # not an adapter: refused in the dialog
        await pilot.press("ctrl+s")
        assert app.screen is dialog and "Invalid value: LoRA adapter" in screen_text(app)
        field.value = str(adapter)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: engine.adapter_path == str(adapter), timeout=30)
        assert text() == adapted

        dialog = await settings()  # it shows the adapter now; emptied, the adapter goes
        assert dialog.query_one("#adapter-path", Input).value == str(adapter)
        dialog.query_one("#adapter-path", Input).value = ""
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: engine.adapter_path is None, timeout=30)
        assert text() == base


def test_fuse_refuses_a_gguf_model_in_one_line(default_model_path, tmp_path, capsys):
    from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: F401 (mlx-lm's layers)

    from model import load
    from model.tune.lora import apply_lora, lora_config, save_adapter

    model, _ = load(str(default_model_path), memory_budget="none")
    config = lora_config(model, 1, 2)
    apply_lora(model, config)
    save_adapter(model, tmp_path / "a", config)
    assert main(["fuse", "--model", str(default_model_path), "--adapter-path",
                 str(tmp_path / "a"), str(tmp_path / "out")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "mixchat quantize" in err
    assert not (tmp_path / "out").exists()


def test_requantized_fuse_keeps_the_bits_and_stays_within_its_report(tiny_mixtral, tmp_path,
                                                                      capsys):  # fmt: skip
    from quantize.fuse import fuse_report

    quantized = tmp_path / "q4"
    assert main(["quantize", str(tiny_mixtral), str(quantized), "--group-size", "32",
                 "--no-eval", "--quiet"]) == 0  # fmt: skip
    adapter = write_adapter(tiny_mixtral, tmp_path / "a", 4, 0.05)
    out = tmp_path / "fused"
    assert main(["fuse", "--model", str(quantized), "--adapter-path", str(adapter), str(out),
                 "--quiet"]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4  # the source's bits
    report = fuse_report(str(quantized), str(adapter), out, max_tokens=64)
    assert report.kl_divergence > 1e-4  # re-quantizing the merged weights costs a little
    dequantized = tmp_path / "float"
    assert main(["fuse", "--model", str(quantized), "--adapter-path", str(adapter),
                 str(dequantized), "--dequantize", "--quiet"]) == 0  # fmt: skip
    assert "quantization" not in json.loads((dequantized / "config.json").read_text())
    exact = fuse_report(str(quantized), str(adapter), dequantized, max_tokens=64)
    assert exact.kl_divergence < 1e-6 and exact.top1_agreement == 1.0  # float: exact
    assert exact.kl_divergence < report.kl_divergence
