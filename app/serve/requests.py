"""OpenAI request bodies -> GenerationRequest, and OpenAI-style errors.

Every problem with a request is an ApiError: an HTTP status and `{"error": {"message", "type",
"code", "param"}}`, the shape the `openai` client and editor plugins understand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from model.errors import MixchatError
from model.generation_settings import GenerationSettings

ROLES = ("system", "user", "assistant")
MAX_STOPS = 16
# OpenAI fields mixchat cannot honour: refused in one line rather than silently ignored.
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs",
               "logit_bias", "echo", "suffix", "best_of")  # fmt: skip


class ApiError(Exception):
    """A request that gets an OpenAI-style JSON error instead of an answer."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type, code, param,
        )  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}  # fmt: skip


@dataclass
class GenerationRequest:
    kind: str  # "chat" | "completion"
    model: str | None
    settings: GenerationSettings
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completion: text, or token ids
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    # mlx-lm's `adapters`: a LoRA adapter directory for this request ("": none); None: the
    # server's --adapter-path (for the model it started with)
    adapter: str | None = None
    # mlx-lm's `chat_template_kwargs`: extra chat template variables ({"enable_thinking": false})
    template_kwargs: dict = field(default_factory=dict)


def parse_json(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def chat_messages(messages: object) -> list[dict]:
    """A request's `messages`, checked: [{role, content}] with text content."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad("messages", f"messages[{i}] needs a role among {', '.join(ROLES)}")
        clean.append({"role": message["role"], "content": content_text(message.get("content"), i)})
    return clean


def parse_chat(body: dict) -> GenerationRequest:
    clean = chat_messages(body.get("messages"))
    if clean[-1]["role"] != "user":
        raise bad("messages", "the last message must be the user's")
    return GenerationRequest("chat", messages=clean, template_kwargs=template_kwargs(body),
                             **common(body))  # fmt: skip


def template_kwargs(body: dict) -> dict:
    """mlx-lm's `chat_template_kwargs` (an object of extra chat template variables)."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise bad("chat_template_kwargs", "'chat_template_kwargs' must be an object")
    return kwargs


def parse_tokenize(body: dict) -> GenerationRequest:
    """mixchat's own `POST /v1/mixchat/tokenize`: {"model", "messages"?} -> the model's
    description and the messages' prompt length (a chat client's context check)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "'model' must be a string")
    adapter = adapter_field(body)
    messages = body.get("messages")
    if messages is None:
        return GenerationRequest("load", model=model, settings=GenerationSettings(),
                                 adapter=adapter)  # fmt: skip
    clean = chat_messages(messages)
    return GenerationRequest("load", model=model, settings=GenerationSettings(), messages=clean,
                             adapter=adapter, template_kwargs=template_kwargs(body))  # fmt: skip


def parse_completion(body: dict) -> GenerationRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ids = isinstance(prompt, list) and prompt and all(is_int(t) and t >= 0 for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not ids:
        raise bad("prompt", "'prompt' must be a non-empty string (or one list of token ids)")
    return GenerationRequest("completion", prompt=prompt, **common(body))


def content_text(content, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):  # fmt: skip
                raise bad("messages", f"messages[{i}]: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad("messages", f"messages[{i}].content must be a string")


def common(body: dict) -> dict:
    """The fields chat and raw completions share; ApiError(400) for any bad one."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise bad(name, f"'{name}' is not supported by mixchat", "unsupported_parameter")
    if body.get("n", 1) != 1:
        raise bad("n", "only n=1 is supported", "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad("response_format", "only text responses are supported", "unsupported_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "'model' must be a string")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    settings = GenerationSettings(
        max_tokens=number(body, key, int, 1 << 30),  # none given: up to the context's end
        temperature=number(body, "temperature", float, 1.0),  # OpenAI's default
        top_p=number(body, "top_p", float, 1.0),
        min_p=number(body, "min_p", float, 0.0),
        seed=number(body, "seed", int, None),
    )
    try:
        settings.validate()
    except MixchatError as e:
        raise bad(None, str(e)) from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad("stop", f"'stop' must be a non-empty string or a list of up to {MAX_STOPS}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options", "'stream_options' must be {\"include_usage\": bool}")
    return dict(model=model, settings=settings, stop=stop, stream=stream,
                include_usage=bool(options.get("include_usage")),
                adapter=adapter_field(body))  # fmt: skip


def adapter_field(body: dict) -> str | None:
    """mlx-lm's per-request `adapters`: a path (on the server's machine), "" for none."""
    adapter = body.get("adapters")
    if adapter is not None and not isinstance(adapter, str):
        raise bad("adapters", "'adapters' must be the path of an adapter directory")
    return adapter


def number(body: dict, name: str, kind: type, default=None):
    value = body.get(name)
    if value is None:
        return default
    if kind is int and is_int(value):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise bad(name, f"'{name}' must be {'an integer' if kind is int else 'a number'}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)
