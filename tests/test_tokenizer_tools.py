"""Mistral's tool tokens (v3, v7 SentencePiece) against mistral-common's encode_chat_completion,
and `mixchat tune` rows with tools on a tiny Mixtral with the v3 tokenizer (ids, loss mask, a run).
"""

from __future__ import annotations

import json

import pytest

from model.errors import MixchatError
from model.tokenizer import SentencePieceTokenizer
from tests.checkpoints import build_hf_checkpoint, mistral_tokenizer_file

DATA = mistral_tokenizer_file("v1").parent
FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}  # fmt: skip


def call(call_id: str | None, name: str, arguments) -> dict:
    """An OpenAI tool call; without an id when call_id is None."""
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return out if call_id is None else {"id": call_id, **out}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str | None, *calls: dict) -> dict:
    return {"role": "assistant", "content": text, **({"tool_calls": list(calls)} if calls else {})}


def result(call_id: str, text: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


ZURICH = [user("Weather in Zürich?"), assistant(None, call("abc123xyz", "get_weather", '{"city": "Zürich"}')),
          result("abc123xyz", '{"temp": 21, "sky": "sunny"}'), assistant("It is 21 °C and sunny.")]  # fmt: skip
CASES = {
    "one tool": ([user("Weather in Paris?")], [WEATHER]),
    "two tools": ([user("hi"), assistant("Hello!"), user("Time?")], [WEATHER, TIME]),
    "call, result, answer": (ZURICH + [user("Thanks")], [WEATHER]),
    "two calls in one turn": (
        [
            user("Weather and time in Rome?"),
            assistant(
                "",
                call("aaaaaaaaa", "get_weather", {"city": "Roma"}),
                call("bbbbbbbbb", "get_time", ""),
            ),
            result("aaaaaaaaa", "cloudy"),
            result("bbbbbbbbb", "12:00"),
        ],
        [WEATHER, TIME],
    ),  # fmt: skip
    "system prompt": (
        [
            {"role": "system", "content": "You are terse."},
            user("Weather in Oslo?"),
            assistant(None, call("ccccccccc", "get_weather", '{"city":"Oslo"}')),
            result("ccccccccc", "-3"),
            assistant("Cold: -3."),
            user("And Bergen?"),
        ],
        [WEATHER],
    ),  # fmt: skip
    "a last call without id, no tools": (
        [user("a"), assistant(None, call(None, "get_time", None))],
        None,
    ),
}


@pytest.fixture(scope="module")
def mistral() -> dict:
    """version -> (ours, mistral-common's, agnostic: a chat may end with any role)."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return {
        v: (
            SentencePieceTokenizer(DATA / f),
            MistralTokenizer.from_file(str(DATA / f), mode=ValidationMode.agnostic),
        )  # fmt: skip
        for v, f in FILES.items()
    }


def reference(ref, messages: list[dict], tools: list | None) -> list[int]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    return ref.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens


@pytest.mark.parametrize("version", ["v3", "v7"])
@pytest.mark.parametrize("case", list(CASES))
def test_tool_chats_match_mistral_common(mistral, version, case):
    ours, ref = mistral[version]
    messages, tools = CASES[case]
    ids = ours.encode_tool_chat(messages, tools)
    assert ids == reference(ref, messages, tools)
    if tools:  # the definitions sit right before the last [INST]
        pieces = [ours.sp.id_to_piece(i) for i in ids]
        last_inst = len(pieces) - 1 - pieces[::-1].index("[INST]")
        assert pieces[last_inst - 1] == "[/AVAILABLE_TOOLS]"


@pytest.mark.parametrize("version", ["v3", "v7"])
def test_training_chat_ending_with_the_answer_matches_mistral_common(mistral, version):
    ours, ref = mistral[version]
    ids, turns = ours.encode_tool_turns(ZURICH, [WEATHER])
    assert ids == reference(ref, ZURICH, [WEATHER])
    pieces = [ours.sp.id_to_piece(i) for i in ids]
    (first, a, b), (second, c, d) = turns
    assert (first, second) == (1, 3) and d == len(ids)
    assert pieces[a] == "[TOOL_CALLS]" and pieces[a - 1] == "[/INST]" and ids[b - 1] == ours.eos_id
    assert pieces[c - 1] == "[/TOOL_RESULTS]" and ours.decode(ids[c:d]) == "It is 21 °C and sunny."


@pytest.mark.parametrize(
    "version, messages, tools, message",
    [
        ("v1", [user("x")], [WEATHER], "Mistral's v1 tokenizer has no tool tokens"),
        ("v2", [user("x")], [WEATHER], "Mistral's v2 tokenizer encodes tool results its own way"),
        ("v3", [user("x"), assistant("y", call("a", "get_time", "{}"))], None,
         "message 1: Mistral's v3 format cannot have text and tool calls in one message"),
        ("v3", ZURICH[:2] + [{"role": "tool", "content": "1"}], None, "message 2 (tool) has no tool_call_id"),
        ("v7", [user("x")], [{"type": "function"}], "tool 0 has no function name"),
        ("v7", [user("x"), assistant(None, {"id": "a"})], None, "message 1: a tool call has no function name"),
    ],
)  # fmt: skip
def test_what_cannot_be_encoded_is_one_line(mistral, version, messages, tools, message):
    with pytest.raises(MixchatError) as e:
        mistral[version][0].encode_tool_chat(messages, tools)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# --- mixchat tune on a Mistral v3 tokenizer -----------------------------------------------------

ROW = {"tools": [WEATHER], "messages": ZURICH}


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    return build_hf_checkpoint(tmp_path_factory.mktemp("tiny-v3"), "mixtral", tokenizer="v3",
                               num_layers=1)  # fmt: skip


def test_tune_row_with_tools_is_mistral_commons_ids_learning_the_assistant_turns(tiny_v3, mistral):
    from model.tokenizer import load_tokenizer
    from model.tune.data import encode_row

    tok = load_tokenizer(tiny_v3)
    row = encode_row(ROW, tok)
    assert row.ids == reference(mistral["v3"][1], ZURICH, [WEATHER])
    learned = [i for i, w in zip(row.ids, row.weights) if w]
    calls = '[{"name": "get_weather", "arguments": {"city": "Zürich"}, "id": "abc123xyz"}]'
    tool_calls = tok.sp.piece_to_id("[TOOL_CALLS]")
    expected = [tool_calls, *tok.encode(calls), tok.eos_id, *tok.encode("It is 21 °C and sunny."),
                tok.eos_id]  # fmt: skip
    assert learned == expected  # the calls and the answer, each with its EOS; no prompt, no result
    # weight 0 on the call turn (Mistral's format) leaves only the answer; no mask: all but the first
    weighted = encode_row(
        {**ROW, "messages": [ZURICH[0], {**ZURICH[1], "weight": 0}, *ZURICH[2:]]}, tok
    )
    answer = [*tok.encode("It is 21 °C and sunny."), tok.eos_id]
    assert [i for i, w in zip(weighted.ids, weighted.weights) if w] == answer
    assert encode_row(ROW, tok, mask_prompt=False).weights == [0] + [1] * (len(row.ids) - 1)


def test_mixchat_tune_runs_on_a_tools_row(tiny_v3, tmp_path, capsys):
    from app.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(ROW, ensure_ascii=False) + "\n")
    out = tmp_path / "adapter"
    assert main(["tune", "--model", str(tiny_v3), "--data", str(data), "--adapter-path", str(out),
                 "--iters", "1", "--batch-size", "1"]) == 0  # fmt: skip
    assert (out / "adapters.safetensors").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({**ROW, "messages": ZURICH[:2] + [{"role": "tool", "content": "1"}]}) + "\n"
    )
    assert main(["tune", "--model", str(tiny_v3), "--data", str(bad), "--iters", "1",
                 "--adapter-path", str(tmp_path / "b")]) != 0  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"{bad}:1: message 2 (tool) has no tool_call_id")
