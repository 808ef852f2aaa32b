"""Moderated chat completions (`"moderation": true` in the body, or every chat completion
under `mixchat serve --safe`): the last user message is checked before anything is generated,
and the reply as it streams, in sentence windows (app/moderation/stream.py). Flagged, the
completion ends with finish_reason "content_filter", as OpenAI's does, streamed or not, with
the moderation result under "moderation"."""

from __future__ import annotations

from app.moderation.stream import ReplyGuard, check_message

from .requests import ApiError, GenerationRequest

CONTENT_FILTER = "content_filter"


def wanted(body: dict, gen: GenerationRequest, safe: bool) -> bool:
    """Whether this request is moderated: its `moderation` field, else the server's --safe."""
    value = body.get("moderation")
    if value is None:
        return safe and gen.kind == "chat"
    if not isinstance(value, bool):
        raise ApiError(400, "'moderation' must be true or false", param="moderation",
                       code="invalid_value")  # fmt: skip
    if value and gen.kind != "chat":
        raise ApiError(400, "'moderation' applies to chat completions (/v1/chat/completions)",
                       param="moderation", code="invalid_value")  # fmt: skip
    return value


def check_prompt(gen: GenerationRequest, policy=None):
    """The flagged result for the request's last user message, else None."""
    last = next((m["content"] for m in reversed(gen.messages or []) if m["role"] == "user"), "")
    return check_message(last, policy)


def refused(base: dict, result, stream: bool) -> dict | list[dict]:
    """The answer to a flagged prompt: nothing generated, finish_reason content_filter (the
    chunks of a stream, or one chat.completion)."""
    moderation = result.to_json()
    if stream:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}  # fmt: skip
        last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": CONTENT_FILTER}
        return [base | {"choices": [first]}, base | {"choices": [last], "moderation": moderation}]
    message = {"role": "assistant", "content": ""}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": CONTENT_FILTER}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return base | {"object": "chat.completion", "choices": [choice], "usage": usage,
                   "moderation": moderation}  # fmt: skip


def reply_guard(policy=None, gen: GenerationRequest | None = None) -> ReplyGuard:
    """The reply's guard: the lexical guard every sentence window; a guard model in `policy`
    every few windows and at the end, judging the reply after the request's last user
    message (Llama Guard's agent turn)."""
    last = next((m["content"] for m in reversed(gen.messages or []) if m["role"] == "user"),
                "") if gen is not None else ""  # fmt: skip
    context = [{"role": "user", "content": last}] if last.strip() else None
    return ReplyGuard(policy, context=context)
