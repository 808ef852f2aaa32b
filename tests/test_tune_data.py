"""mixchat tune's data: rows with tools (against mlx-lm's ChatDataset on transformers' template
rendering, and the refusals), and --test / --test-batches (against mlx-lm's evaluate)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from app.cli import main
from model.tune.data import DataError, encode_row, load_dataset

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_ROW = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Quel temps fait-il à Paris ?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "18 °C, ensoleillé"},
        {"role": "assistant", "content": "Il fait 18 °C et beau à Paris."},
    ],
}
# A ChatML template that renders tools the way Qwen2.5's does (definitions in the system turn,
# calls as <tool_call> JSON, results as "tool" turns).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}"
    "{%- endfor %}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- if message.content %}\n{{ message.content }}{% endif %}"
    '{%- for call in message.tool_calls %}{{ \'\\n\' }}<tool_call>{"name": "{{ call.function.name }}", '
    '"arguments": {{ call.function.arguments | tojson }}}</tool_call>{%- endfor %}<|im_end|>\n'
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def default_tokenizer(default_model_path):
    from model.tokenizer import load_tokenizer
    from model.weights import locate

    return load_tokenizer(locate(default_model_path).gguf_metadata)


@pytest.fixture(scope="module")
def tool_tokenizer_dir(default_tokenizer, tmp_path_factory):
    """The default model's vocabulary as tokenizer.json, with a chat template that has tools."""
    path = tmp_path_factory.mktemp("tools-tokenizer")
    default_tokenizer.tok.save(str(path / "tokenizer.json"))
    config = {"chat_template": TOOL_TEMPLATE, "eos_token": "<|im_end|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def learned_runs(row) -> list[tuple[int, int]]:
    """(start, end) of each run of learned tokens."""
    runs, start = [], None
    for t, w in enumerate(row.weights + [0]):
        if w and start is None:
            start = t
        elif not w and start is not None:
            runs.append((start, t))
            start = None
    return runs


def test_tool_rows_are_encoded_as_mlx_lm_chat_dataset(tool_tokenizer_dir):
    from mlx_lm.tuner.datasets import ChatDataset
    from transformers import AutoTokenizer

    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(tool_tokenizer_dir)
    row = encode_row(TOOL_ROW, tok)
    reference = AutoTokenizer.from_pretrained(str(tool_tokenizer_dir))
    tokens, offset = ChatDataset([TOOL_ROW], reference, mask_prompt=True).process(TOOL_ROW)
    # the same tokens (mlx-lm's render ends with the newline after the last <|im_end|>)
    assert row.ids == tokens[: len(row.ids)] and tok.decode(tokens[len(row.ids) :]) == "\n"
    assert "get_weather" in tok.decode(row.ids[:offset])  # the definitions were rendered
    calls, answer = learned_runs(row)
    assert answer == (offset, len(row.ids))  # the last reply starts where mlx-lm's does
    assert json.loads(re.search(r"<tool_call>(.*)</tool_call>", tok.decode(row.ids[slice(*calls)]))
                      .group(1)) == {"name": "get_weather", "arguments": {"city": "Paris"}}  # fmt: skip
    assert tok.decode(row.ids[slice(*answer)]) == "Il fait 18 °C et beau à Paris."
    results = tok.decode(row.ids[calls[1] : answer[0]])  # the tool's result: read, not learned
    assert "18 °C, ensoleillé" in results


def test_tool_rows_train_and_test(tool_tokenizer_dir, tmp_path):
    """prompt/completion rows carry tools too (mlx-lm's CompletionsDataset)."""
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(tool_tokenizer_dir)
    row = encode_row({"tools": [WEATHER], "prompt": "Météo ?", "completion": "Beau."}, tok)
    assert "get_weather" in tok.decode(row.ids) and learned_runs(row)
    data = load_dataset(write_rows(tmp_path / "t.jsonl", [TOOL_ROW, TOOL_ROW]), tok, 4096)
    assert data.train.learned == 2 * encode_row(TOOL_ROW, tok).learned


@pytest.mark.parametrize(
    "row, message",
    [
        (TOOL_ROW, "has no tool definitions or tool calls: use a model whose template renders"),
        ({**TOOL_ROW, "tools": None}, "has no tool calls: use a model"),
        ({"messages": TOOL_ROW["messages"][:1] + [{"role": "assistant"}]}, "message 1 (assistant)"
         " has no text content"),
        ({**TOOL_ROW, "tools": {"name": "x"}}, '"tools" must be a list of tool definitions'),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]},
                       {"role": "assistant", "content": "y"}]},
         "message 0: tool_calls belong on assistant messages"),
    ],
)  # fmt: skip
def test_default_model_refuses_tools_naming_file_and_line(default_tokenizer, tmp_path, row,
                                                          message):  # fmt: skip
    """The default model's template has no tools: one line naming the file and line."""
    path = write_rows(tmp_path / "tools.jsonl", [{"prompt": "a", "completion": "b"}, row])
    with pytest.raises(DataError) as e:
        load_dataset(path, default_tokenizer, 2048)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_mistral_v1_refuses_tools_naming_file_and_line(tmp_path):
    """v1 has no tool tokens (v3 and v7 encode tools: tests/test_tokenizer_tools.py)."""
    from model.tokenizer import SentencePieceTokenizer
    from tests.checkpoints import mistral_tokenizer_file

    tok = SentencePieceTokenizer(mistral_tokenizer_file("v1"))
    path = write_rows(tmp_path / "train.jsonl", [TOOL_ROW])
    with pytest.raises(DataError) as e:
        load_dataset(path, tok, 2048)
    assert str(e.value) == (f"{path}:1: Mistral's v1 tokenizer has no tool tokens ([AVAILABLE_TOOLS], "
                            "[TOOL_CALLS]): tools need a v3 or v7 tokenizer")  # fmt: skip


# --- --test -----------------------------------------------------------------------------------

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    }  # fmt: skip
    for i in range(8)
]


def test_loss(out: str) -> float:
    match = re.fullmatch(r"Test loss (\d+\.\d{3}), Test ppl (\d+\.\d{3})\.\n", out)
    assert match, out
    loss, ppl = float(match.group(1)), float(match.group(2))
    assert ppl == pytest.approx(math.exp(loss), rel=2e-3)
    return loss


test_loss.__test__ = False  # a helper, not a test


def test_test_flag_after_training_alone_and_on_the_base_model(tiny_mixtral, tmp_path, capsys):
    import mlx.core as mx
    from mlx_lm.tuner.trainer import default_loss, evaluate

    from model import load
    from model.tokenizer import load_tokenizer

    data = tmp_path / "data"
    data.mkdir()
    write_rows(data / "train.jsonl", CHATS)
    write_rows(data / "test.jsonl", CHATS[2:7])
    out = tmp_path / "adapter"
    common = ["tune", "--model", str(tiny_mixtral), "--data", str(data), "--batch-size", "2"]
    assert main([*common, "--adapter-path", str(out), "--iters", "3", "--learning-rate", "1e-2",
                 "--test"]) == 0  # fmt: skip
    trained = test_loss(capsys.readouterr().out)
    assert main([*common, "--adapter-path", str(out), "--iters", "0", "--test"]) == 0
    assert test_loss(capsys.readouterr().out) == trained  # the saved adapter, evaluated alone
    assert main([*common, "--adapter-path", "", "--iters", "0", "--test"]) == 0
    base = test_loss(capsys.readouterr().out)
    assert base != trained
    assert main([*common, "--adapter-path", "", "--iters", "0", "--test",
                 "--test-batches", "1"]) == 0  # fmt: skip
    assert test_loss(capsys.readouterr().out) != base  # 1 batch of 2 rows, not 2 batches

    # mlx-lm's evaluate on the same model, rows (tokens, prompt length) and batch size; its
    # default_loss also counts the first padding token after each row (steps <= length), which
    # mixchat does not learn: the reference ends each row's mask one token earlier
    tok = load_tokenizer(tiny_mixtral)
    rows = [encode_row(c, tok) for c in CHATS[2:7]]
    dataset = [(r.ids, r.weights.index(1)) for r in rows]
    model, _ = load(tiny_mixtral, adapter_path=str(out))
    mx.random.seed(0)

    def loss(model, batch, lengths):
        return default_loss(model, batch, lengths - mx.array([0, 1]))

    expected = evaluate(model, dataset, batch_size=2, num_batches=-1, loss=loss)
    assert trained == pytest.approx(expected, abs=1.5e-3)


def test_test_only_without_adapter_is_one_line(tiny_mixtral, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_rows(data / "test.jsonl", CHATS[:2])  # no train.jsonl: not needed to test
    args = ["tune", "--model", str(tiny_mixtral), "--data", str(data), "--iters", "0", "--test"]
    assert main([*args, "--adapter-path", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no adapter in" in err and "--adapter-path ''" in err and "\n" not in err
    assert main([*args, "--adapter-path", ""]) == 0
    test_loss(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tool_model(default_tokenizer, tool_tokenizer_dir, tmp_path_factory):
    """A tiny random Mixtral over the default model's vocabulary, with the tools template."""
    import shutil

    from tests import checkpoints

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(checkpoints.VOCAB_SIZES, "v1", default_tokenizer.vocab_size)
        path = checkpoints.build_hf_checkpoint(tmp_path_factory.mktemp("tool-model"))
    (path / "tokenizer.model").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tool_tokenizer_dir / name, path / name)
    return path


def test_tune_learns_tool_rows_and_tests_them(tool_model, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    completion = {"tools": [WEATHER], "prompt": "Météo à Lyon ?", "completion": "Je regarde."}
    for split in ("train", "test"):
        write_rows(data / f"{split}.jsonl", [TOOL_ROW, completion])
    common = ["tune", "--model", str(tool_model), "--data", str(data), "--batch-size", "1"]
    assert main([*common, "--adapter-path", "", "--iters", "0", "--test"]) == 0
    base = test_loss(capsys.readouterr().out)
    out = tmp_path / "adapter"
    assert main([*common, "--adapter-path", str(out), "--iters", "4", "--learning-rate", "1e-3",
                 "--test"]) == 0  # fmt: skip
    assert test_loss(capsys.readouterr().out) < base - 1  # the tool rows were learned
    assert (out / "adapters.safetensors").is_file()
