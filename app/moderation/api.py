"""The moderation endpoints' bodies (model-free): OpenAI's POST /v1/moderations and Mistral's
POST /v1/chat/moderations, answered by a Policy. Bad bodies raise MixchatError (one line);
app/serve/server.py turns it into a 400."""

from __future__ import annotations

import time
import uuid

from model.errors import MixchatError

from .result import CATEGORIES, ModerationResult

MODEL = "mixchat-moderation"
MAX_INPUTS = 256
# OpenAI's category names, from ours, so tools that read OpenAI's fields find them too.
OPENAI_NAMES = {
    "hate": "hate_and_discrimination",
    "harassment/threatening": "violence_and_threats",
    "violence": "violence_and_threats",
    "illicit": "dangerous_and_criminal_content",
    "self-harm": "selfharm",
    "self-harm/intent": "selfharm",
    "sexual": "sexual",
}


def result_body(result: ModerationResult, openai_names: bool) -> dict:
    body = result.to_json()
    if openai_names:
        for name, ours in OPENAI_NAMES.items():
            body["categories"].setdefault(name, body["categories"][ours])
            body["category_scores"].setdefault(name, body["category_scores"][ours])
    return body


def texts_of(body: dict) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if len(value) > MAX_INPUTS:
            raise MixchatError(f"'input' has {len(value)} texts; at most {MAX_INPUTS}")
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        texts = [v.get("text") for v in value if v.get("type") == "text"]  # OpenAI's multi-modal
        if texts and all(isinstance(t, str) for t in texts):
            return texts
    raise MixchatError("'input' must be a string or a non-empty list of strings")


def answer(model, results: list[dict]) -> dict:
    return {"id": f"modr-{uuid.uuid4().hex}", "model": model if isinstance(model, str) else MODEL,
            "created": int(time.time()), "results": results}  # fmt: skip


def moderations(policy, body: dict) -> dict:
    """OpenAI's /v1/moderations: {"input": str | [str], "model"?} -> one result per text."""
    results = [result_body(policy.check(text), openai_names=True) for text in texts_of(body)]
    return answer(body.get("model"), results)


def conversations_of(body: dict) -> list[list[dict]]:
    value = body.get("input")
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        value = [value]  # one conversation
    if not (isinstance(value, list) and value and all(isinstance(c, list) and c for c in value)):
        raise MixchatError("'input' must be a list of messages or a list of conversations")
    for conversation in value:
        for m in conversation:
            if not (isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                    and isinstance(m.get("content"), str)):  # fmt: skip
                raise MixchatError("each message needs a role (user, assistant or system) "
                                   "and a text content")  # fmt: skip
    return value


def chat_moderations(policy, body: dict) -> dict:
    """Mistral's /v1/chat/moderations: the last message of each conversation, in its context."""
    results = []
    for conversation in conversations_of(body):
        *context, last = conversation
        role = "assistant" if last["role"] == "assistant" else "user"
        context = [m for m in context if m["role"] in ("user", "assistant")]
        results.append(result_body(policy.check(last["content"], role, context), False))
    return answer(body.get("model"), results)


__all__ = ["CATEGORIES", "chat_moderations", "moderations"]
