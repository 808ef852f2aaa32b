"""The one HTTP client of `mixchat serve` (standard library only: no MLX), used by `mixchat ask`
(app/cli/ask_server.py) and the chat app's RemoteEngine (app/remote_engine.py).

One connection per request. A server that is not there is ``ServerGone``; one that answers with
an OpenAI-style error is ``Refused`` (its status, message and code kept); a streamed reply is
read with ``ReplyStream``: text pieces, then the server's figures as a GenerationStats.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model.errors import MixchatError
from model.stats import GenerationStats

CONNECT_TIMEOUT = 1.0  # seconds; a loopback server that is not there refuses at once
CHAT_PATH = "/v1/chat/completions"
TOKENIZE_PATH = "/v1/mixchat/tokenize"


class ServerGone(MixchatError):
    """The server could not be reached, or closed the connection mid-reply (``reason``: why,
    in a few words)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class Refused(MixchatError):
    """The server answered with an error: one line for the user, and what it said (HTTP status,
    message, OpenAI-style code; ``openai`` False when the body was not an OpenAI-style error,
    so not a mixchat server)."""

    def __init__(self, text: str, status: int, message: str, code: str | None, openai: bool):
        super().__init__(text)
        self.status, self.message, self.code, self.openai = status, message, code, openai


def reason(error: Exception) -> str:
    """Why a request failed, in a few words."""
    if isinstance(error, ServerGone):
        return error.reason
    return str(error) or type(error).__name__


SERVER_MODEL = "default"  # a request's `model` for the model the server has loaded (else its
# start model): what `ask` sends without --model, so it never makes the server swap models


def model_field(model: str | None) -> str:
    """What the server should load: a local path made absolute (the server's working directory
    is not ours), else the name or repo id as given; None: the embedded default, as in-process
    (not the server's own default; the chat app asks for it so)."""
    if not model:
        from model.registry import DEFAULT_MODEL

        return DEFAULT_MODEL
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def chat_body(model: str, messages: list[dict], settings: Any = None) -> dict:
    """A streamed chat completion's request body; ``settings``: a GenerationSettings or None
    (the server's defaults)."""
    body = {"model": model, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if settings is not None:
        body |= {"max_tokens": settings.max_tokens, "temperature": settings.temperature,
                 "top_p": settings.top_p, "min_p": settings.min_p}  # fmt: skip
        if settings.seed is not None:
            body["seed"] = settings.seed
    return body


def split_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MixchatError(f"the server setting is not an http URL: {url!r}")
    return parts


def open_connection(url: str) -> http.client.HTTPConnection:
    """A connected HTTP connection to the server (ServerGone if nothing answers)."""
    parts = split_url(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                timeout=CONNECT_TIMEOUT)  # fmt: skip
    try:
        conn.connect()
    except OSError as e:
        raise ServerGone(f"cannot reach the server at {url} ({reason(e)})") from None
    conn.sock.settimeout(None)  # a long prefill may come before the first byte
    return conn


def post(conn: http.client.HTTPConnection, url: str, path: str, body: dict,
         api_key: str | None) -> http.client.HTTPResponse:  # fmt: skip
    """POST ``body`` as JSON; a non-200 answer is Refused (its body read)."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn.request("POST", split_url(url).path.rstrip("/") + path, json.dumps(body).encode(), headers)
    response = conn.getresponse()
    if response.status != 200:
        raise refusal(response, url)
    return response


def refusal(response: http.client.HTTPResponse, url: str) -> Refused:
    """A non-200 answer as a one-line Refused: the server's message, its wanted API key said."""
    try:
        error = json.loads(response.read(1 << 16))["error"]
        message, code, openai = error["message"], error.get("code"), True
    except (OSError, ValueError, KeyError, TypeError):
        message, code, openai = f"HTTP {response.status}", None, False
    if response.status == 401:
        text = f"the server at {url} wants an API key: set MIXCHAT_API_KEY ({message})"
    else:
        text = f"server at {url}: {message}"
    return Refused(text, response.status, message, code, openai)


def events(response: http.client.HTTPResponse) -> Iterator[dict]:
    """The JSON bodies of a server-sent event stream, up to `data: [DONE]`."""
    while line := response.readline():
        line = line.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)
    raise ServerGone("the server closed the connection before the reply ended")


class ReplyStream:
    """A streamed chat completion: iterating yields its text pieces; then ``stats`` (the
    server's figures: ``stats.prompt_tokens`` the tokens prefilled), ``prompt_tokens`` (the
    whole prompt, OpenAI's usage; None if not sent), ``model``, ``memory_notice`` and
    ``replaced_model`` (the model the server unloaded for this one, else None) are set. An
    error event is a one-line MixchatError (ServerGone when the server is shutting down); no
    figures: ServerGone."""

    def __init__(self, response: http.client.HTTPResponse, url: str):
        self.response = response
        self.url = url
        self.stats: GenerationStats | None = None
        self.model: str | None = None
        self.memory_notice = ""
        self.prompt_tokens: int | None = None
        self.replaced_model: str | None = None

    def __iter__(self) -> Iterator[str]:
        for event in events(self.response):
            if error := event.get("error"):
                message = error.get("message")
                if error.get("code") == "shutting_down":
                    raise ServerGone(f"server at {self.url}: {message}", reason=message)
                raise MixchatError(f"server at {self.url}: {message}")
            for choice in event.get("choices", []):
                if text := choice.get("delta", {}).get("content"):
                    yield text
            if figures := event.get("mixchat"):
                self.stats = GenerationStats.from_json(figures)
                self.memory_notice = figures.get("memory_notice") or ""
                self.replaced_model = figures.get("replaced_model") or None
            if isinstance(usage := event.get("usage"), dict):
                self.prompt_tokens = usage.get("prompt_tokens")
            self.model = event.get("model") or self.model
        if self.stats is None:
            raise ServerGone(f"the server at {self.url} sent no statistics")


def describe(url: str, model: str, api_key: str | None, messages: list[dict] | None = None,
             adapter: str | None = None, template_kwargs: dict | None = None) -> dict:  # fmt: skip
    """The server's description of `model` (loading it if need be), with the prompt length of
    `messages` if given. ServerGone when nothing answers; Refused for an error answer."""
    conn = open_connection(url)
    try:
        body = {"model": model} | ({"messages": messages} if messages is not None else {})
        if adapter is not None:  # mlx-lm's per-request adapter ("": none)
            body["adapters"] = adapter
        if template_kwargs:  # the prompt counted as it will be rendered (enable_thinking)
            body["chat_template_kwargs"] = template_kwargs
        try:
            return json.loads(post(conn, url, TOKENIZE_PATH, body, api_key).read())
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise ServerGone(f"the server at {url} did not answer ({reason(e)})") from None
    finally:
        conn.close()
