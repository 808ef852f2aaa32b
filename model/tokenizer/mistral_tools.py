"""Mistral's tool-calling chat format on SentencePiece vocabularies (v3, v7), token for token what
mistral-common's `MistralTokenizer.encode_chat_completion(ChatCompletionRequest(messages=...,
tools=...))` gives (its InstructTokenizerV3/V7 and request normalizers; written here, mistral-common
is a test dependency only).

- tools: `[AVAILABLE_TOOLS]` + JSON list of the definitions (type, function: name, description,
  parameters) + `[/AVAILABLE_TOOLS]`, right before the `[INST]` of the last user message;
- an assistant's calls: `[TOOL_CALLS]` + JSON list of {name, arguments, id (unless absent)} + EOS
  (v3: text and calls in one message are refused; v7: the text, then the calls);
- a tool result: v3 `[TOOL_RESULTS]` {"content", "call_id"} `[/TOOL_RESULTS]` (the content parsed
  as JSON when it is JSON); v7 `[TOOL_RESULTS]` call id `[TOOL_CONTENT]` content `[/TOOL_RESULTS]`.

Runs of user or assistant messages are merged (contents joined with a blank line, calls
concatenated); tool messages stay one each. v1 has no tool tokens and v2 encodes results
differently: both are refused.
"""

from __future__ import annotations

import json

from ..errors import MixchatError
from .base import Tokenizer

TOOL_PIECES = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
               "[/TOOL_RESULTS]")  # fmt: skip


def tool_ids(tok: Tokenizer) -> dict[str, int]:
    """`tok` is a SentencePieceTokenizer (not imported here: it imports this module).
    The control ids of Mistral's tool pieces; MixchatError (one line) when the format has none."""
    sp = tok.sp
    ids = {}
    for piece in TOOL_PIECES + (("[TOOL_CONTENT]",) if tok.format == "v7" else ()):
        i = sp.piece_to_id(piece)
        if i == sp.unk_id() or not sp.is_control(i):
            ids = None
            break
        ids[piece] = i
    if tok.format == "v1" or ids is None:
        raise MixchatError(f"Mistral's {tok.format} tokenizer has no tool tokens "
                           "([AVAILABLE_TOOLS], [TOOL_CALLS]): tools need a v3 or v7 tokenizer")  # fmt: skip
    if tok.format == "v3" and tok.mistral_version() == "v2":
        raise MixchatError("Mistral's v2 tokenizer encodes tool results its own way: mixchat "
                           "encodes tools for v3 and v7 tokenizers")  # fmt: skip
    return ids


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _parsed(text: str | None) -> object:
    """mistral-common's normalisation: empty -> {}, JSON -> its value, anything else as is."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _tool(i: int, tool: object) -> dict:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise MixchatError(f"tool {i} has no function name")
    parameters = function.get("parameters")
    if not isinstance(parameters, dict):
        raise MixchatError(f"tool {i} ({function['name']}): parameters must be a JSON object")
    description = function.get("description", "")
    return {"type": "function", "function": {"name": function["name"],
            "description": description if isinstance(description, str) else "",
            "parameters": parameters}}  # fmt: skip


def _call(i: int, call: object) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise MixchatError(f"message {i}: a tool call has no function name")
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, (dict, str)):
        raise MixchatError(f"message {i}: tool call arguments must be a JSON object or string")
    parsed = arguments if isinstance(arguments, dict) else _parsed(arguments)
    out = {"name": function["name"], "arguments": parsed}
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise MixchatError(f"message {i}: a tool call id must be a string")
    if call_id and call_id != "null":
        out["id"] = call_id
    return out


def encode_tool_turns(tok: Tokenizer, messages: list[dict],
                      tools: list | None) -> tuple[list[int], list[tuple[int, int, int]]]:  # fmt: skip
    """(ids, turns): the chat's ids (it may end with any role) and, per assistant turn, (index of
    its first message, start, end): ids[start:end] is the turn, its EOS included."""
    marks = tool_ids(tok)
    v7 = tok.format == "v7"
    tools = [_tool(i, t) for i, t in enumerate(tools or [])]
    if not messages:
        raise MixchatError("the conversation has no messages")

    # The normalizer: runs of one role merge (system messages pulled out for v3, kept for v7).
    turns: list[dict] = []  # {"role", "texts"/"text", "calls", "first", ...}
    system: list[str] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant", "tool"):
            raise MixchatError(f"message {i} has role {role!r}; expected system, user, assistant or tool")  # fmt: skip
        content, calls = m.get("content"), m.get("tool_calls") or []
        if content is None and role in ("assistant", "tool"):
            content = ""
        if not isinstance(content, str):
            raise MixchatError(f"message {i} ({role}) has no text content")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise MixchatError(f"message {i} (tool) has no tool_call_id")
            turns.append({"role": "tool", "text": content, "call_id": call_id, "first": i})
            continue
        if role == "system" and not v7:
            if content:
                system.append(content)
            if turns and turns[-1]["role"] != "tool":
                turns[-1]["closed"] = True  # a system message still ends the run it interrupts
            continue
        if role == "assistant" and content and calls and not v7:
            raise MixchatError(f"message {i}: Mistral's v3 format cannot have text and tool calls in one message")  # fmt: skip
        calls = [_call(i, c) for c in calls]
        last = turns[-1] if turns else None
        weight = m.get("weight") if role == "assistant" else None  # runs split where it changes
        if (role != "system" and last and last["role"] == role and not last.get("closed")
                and last.get("weight") == weight):  # fmt: skip
            last["texts"].append(content)
            last["calls"] += calls
        else:
            turns.append({"role": role, "texts": [content], "calls": calls, "first": i,
                          "weight": weight})  # fmt: skip
    if not turns or (turns[0]["role"] != "user" and not v7):
        turns.insert(0, {"role": "user", "texts": [""], "calls": [], "first": -1})
    prompt = "\n\n".join(system) or None

    users = [k for k, t in enumerate(turns) if t["role"] == "user"]
    ids = [] if tok.bos_id is None else [tok.bos_id]
    spans = []
    for k, turn in enumerate(turns):
        role = turn["role"]
        text = "\n\n".join(c for c in turn.get("texts", []) if c)
        if role == "user":
            if users and k == users[-1]:
                if tools:
                    ids += [marks["[AVAILABLE_TOOLS]"], *tok.sp.encode(_json(tools)),
                            marks["[/AVAILABLE_TOOLS]"]]  # fmt: skip
                if prompt:
                    text = prompt + "\n\n" + text
            ids += [tok.inst, *tok.sp.encode(text), tok.end_inst]
        elif role == "system":
            ids += [tok.sys, *tok.sp.encode(text), tok.end_sys]
        elif role == "tool":
            if v7:
                ids += [marks["[TOOL_RESULTS]"], *tok.sp.encode(turn["call_id"]),
                        marks["[TOOL_CONTENT]"], *tok.sp.encode(turn["text"]),
                        marks["[/TOOL_RESULTS]"]]  # fmt: skip
            else:
                result = {"content": _parsed(turn["text"]), "call_id": turn["call_id"]}
                ids += [marks["[TOOL_RESULTS]"], *tok.sp.encode(_json(result)),
                        marks["[/TOOL_RESULTS]"]]  # fmt: skip
        else:
            if not text and not turn["calls"]:
                raise MixchatError(f"message {turn['first']} (assistant) is empty")
            if text and turn["calls"] and not v7:
                raise MixchatError(f"message {turn['first']}: Mistral's v3 format cannot have text and tool calls in one turn")  # fmt: skip
            start = len(ids)
            if text and (v7 or not turn["calls"]):
                ids += tok.sp.encode(text.rstrip(" "))
            if turn["calls"]:
                ids += [marks["[TOOL_CALLS]"], *tok.sp.encode(_json(turn["calls"]))]
            ids.append(tok.eos_id)
            spans.append((turn["first"], start, len(ids)))
    return ids, spans
