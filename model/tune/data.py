"""Training data: mlx-lm's layouts and row formats, and Mistral's fine-tuning format, encoded
exactly as mixchat encodes chats for inference (`Tokenizer.encode_chat`).

A dataset is a folder with train.jsonl (and optional valid.jsonl, test.jsonl) or one .jsonl
file (then it is the training set). Each line is one JSON object:
- {"messages": [{"role", "content", "weight"?}, ...]}: a chat (mlx-lm's, Mistral's); an
  assistant message with "weight": 0 (Mistral's format) is not learned;
- {"prompt": ..., "completion": ...}: a user message and the assistant's reply;
- {"text": ...}: plain text, learned whole (BOS when the tokenizer has one, then EOS).
A chat or prompt/completion row may carry "tools" (mlx-lm's format, OpenAI's schema), and its
messages assistant "tool_calls" and "tool" results: they are rendered by the model's chat template
with `tools=` as mlx-lm's ChatDataset does (a template that has no tools refuses them), or in
Mistral's v3/v7 tool tokens as mistral-common encodes them (v1 has none and refuses them); the
tool calls are learned like any assistant turn, the tool results are not.

A chat's tokens are `encode_chat` of the whole chat; each assistant turn starts where
`encode_chat` of the messages before it (the generation prompt) ends, and runs to the first
end-of-sequence token after that, included. With `mask_prompt` (the default) only assistant
turns are learned; without it, every token is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MixchatError
from ..tokenizer import SentencePieceTokenizer, Tokenizer

SPLITS = ("train", "valid", "test")


class DataError(MixchatError):
    """A dataset that cannot be used (one line, naming file:line where there is one)."""


@dataclass
class Row:
    """One training sequence: ids, and weights[t] = 1 when ids[t] is learned (predicted from
    ids[:t]); weights[0] is always 0."""

    ids: list[int]
    weights: list[int]

    @property
    def learned(self) -> int:
        return sum(self.weights[1:])


@dataclass
class Split:
    path: Path
    rows: list[Row] = field(default_factory=list)
    truncated: int = 0  # rows cut to max_seq_length

    @property
    def learned(self) -> int:
        return sum(row.learned for row in self.rows)


@dataclass
class Dataset:
    train: Split
    valid: Split | None = None
    test: Split | None = None

    def warnings(self, max_seq_length: int) -> list[str]:
        """One line when rows were truncated (the count), else none."""
        splits = [s for s in (self.train, self.valid, self.test) if s is not None]
        count = sum(s.truncated for s in splits)
        if not count:
            return []
        return [f"{count} row{'s' * (count != 1)} longer than --max-seq-length {max_seq_length} "
                "tokens were truncated"]  # fmt: skip


def load_dataset(path: str | Path, tokenizer: Tokenizer, max_seq_length: int,
                 mask_prompt: bool = True) -> Dataset:  # fmt: skip
    """Read and encode a dataset; raises DataError for a missing layout, a malformed row, or a
    training set with nothing to learn."""
    path = Path(path)
    if path.is_dir():
        files = {name: path / f"{name}.jsonl" for name in SPLITS}
        if not files["train"].is_file():
            raise DataError(f"{path} has no train.jsonl")
    elif path.is_file():
        files = {"train": path}
    else:
        raise DataError(f"no dataset at {path}: give a folder with train.jsonl, or a .jsonl file")
    splits = {
        name: read_split(file, tokenizer, max_seq_length, mask_prompt)
        for name, file in files.items()
        if file.is_file()
    }
    train = splits["train"]
    if not train.rows:
        raise DataError(f"{train.path} has no rows")
    if not train.learned:
        raise DataError(f"{train.path} has nothing to learn (no assistant turn with weight)")
    return Dataset(train, splits.get("valid"), splits.get("test"))


def read_split(path: Path, tokenizer: Tokenizer, max_seq_length: int, mask_prompt: bool) -> Split:
    split = Split(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = encode_row(json.loads(line), tokenizer, mask_prompt)
        except (json.JSONDecodeError, MixchatError) as e:
            message = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise DataError(f"{path}:{number}: {message}") from None
        if len(row.ids) > max_seq_length:
            row = Row(row.ids[:max_seq_length], row.weights[:max_seq_length])
            split.truncated += 1
        split.rows.append(row)
    return split


def encode_row(row: object, tokenizer: Tokenizer, mask_prompt: bool = True) -> Row:
    """One JSON row -> Row; raises MixchatError (one line) when it is malformed."""
    if not isinstance(row, dict):
        raise MixchatError(f"expected a JSON object, not {type(row).__name__}")
    tools = row.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise MixchatError('"tools" must be a list of tool definitions (JSON objects)')
    if "messages" in row:
        return encode_chat(row["messages"], tokenizer, mask_prompt, tools)
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise MixchatError('"prompt" and "completion" must both be strings')
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return encode_chat(chat, tokenizer, mask_prompt, tools)
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise MixchatError('"text" must be a non-empty string')
        return encode_text(row["text"], tokenizer)
    raise MixchatError('a row needs "messages", "prompt" and "completion", or "text"')


def encode_text(text: str, tokenizer: Tokenizer) -> Row:
    ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(text)
    eos = min(tokenizer.eos_ids) if tokenizer.eos_ids else None
    if eos is not None and ids[-1] != eos:
        ids.append(eos)
    return Row(ids, [0] + [1] * (len(ids) - 1))


def encode_chat(messages: object, tokenizer: Tokenizer, mask_prompt: bool = True,
                tools: list | None = None) -> Row:  # fmt: skip
    """A chat -> its ids as encode_chat gives them, with its assistant turns marked. A chat with
    tools (definitions, calls or results) is rendered with them (`encode_tool_chat`)."""
    chat = check_chat(messages)
    if not tokenizer.has_chat_template:
        raise MixchatError('this model has no chat template: use {"text": ...} rows')
    turns = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
    if not turns:
        raise MixchatError("the chat has no assistant message")
    with_tools = tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in chat)
    if with_tools and mistral_chat(tokenizer):
        return encode_mistral_tool_chat(chat, tokenizer, mask_prompt, tools)
    if with_tools:  # the messages as the template takes them (mlx-lm passes them as they are)
        plain = [{k: v for k, v in m.items() if k != "weight"} for m in chat]

        def encode(part: list[dict]) -> list[int]:
            return tokenizer.encode_tool_chat(part, tools)
    else:
        plain = [{"role": m["role"], "content": m["content"]} for m in chat]
        encode = tokenizer.encode_chat
    ends_open = plain[-1]["role"] != "assistant"
    # encode_chat takes chats that end with a user message: a last, empty user turn (whose
    # tokens are dropped) gives the tokens of everything before it.
    full = encode(plain if ends_open else plain + [{"role": "user", "content": ""}])
    weights = [0] * len(full)
    end = 0
    for i in turns:
        if i == 0:
            raise MixchatError("the chat starts with an assistant message")
        prompt = encode(plain[:i])
        if full[: len(prompt)] != prompt:
            raise MixchatError("this model's chat template does not encode chats by prefix")
        start = len(prompt)
        stop = next((t for t in range(start, len(full)) if full[t] in tokenizer.eos_ids), None)
        if stop is None:
            raise MixchatError("this model's chat template ends no assistant turn with EOS")
        end = stop + 1
        if chat[i].get("weight", 1) or not mask_prompt:
            weights[start:end] = [1] * (end - start)
    if ends_open:
        end = len(full)
    ids, weights = full[:end], weights[:end]
    if not mask_prompt:
        weights = [0] + [1] * (len(ids) - 1)
    return Row(ids, weights)


def mistral_chat(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer encodes chats in Mistral's own format (a tokenizer.model, or a GGUF
    with one of Mistral's vocabularies), not with a chat template."""
    return isinstance(tokenizer, SentencePieceTokenizer) and bool(
        getattr(tokenizer, "mistral", True)
    )


def encode_mistral_tool_chat(chat: list[dict], tokenizer: SentencePieceTokenizer, mask_prompt: bool,
                             tools: list | None) -> Row:  # fmt: skip
    """A chat with tools in Mistral's format, as mistral-common encodes a whole fine-tuning
    conversation (tools before the last user message): its assistant turns ([TOOL_CALLS] JSON
    or text, EOS included) are learned, tool results and prompts are not."""
    if chat[0]["role"] == "assistant":
        raise MixchatError("the chat starts with an assistant message")
    ids, turns = tokenizer.encode_tool_turns(chat, tools)
    weights = [0] * len(ids)
    for first, start, end in turns:
        if chat[first].get("weight", 1) or not mask_prompt:
            weights[start:end] = [1] * (end - start)
    if not mask_prompt:
        weights = [0] + [1] * (len(ids) - 1)
    return Row(ids, weights)


def check_chat(messages: object) -> list[dict]:
    """The messages of a row, checked: roles, string contents (an assistant message with
    `tool_calls` may have none), 0/1 weights on assistants."""
    if not isinstance(messages, list) or not messages:
        raise MixchatError('"messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MixchatError(f"message {i} is not an object")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise MixchatError(
                f"message {i} has role {role!r}; expected system, user, assistant or tool"
            )
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise MixchatError(f"message {i}: tool_calls belong on assistant messages")
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise MixchatError(f"message {i}: tool_calls must be a list of JSON objects")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise MixchatError(f"message {i} ({role}) has no text content")
        if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1)):
            raise MixchatError(f"message {i}: weight must be 0 or 1, on assistant messages only")
    return messages
