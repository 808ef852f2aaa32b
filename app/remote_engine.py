"""The chat app's engine through a running `mixchat serve` (standard library only: no MLX).

connect() asks the server at settings.server (MIXCHAT_SERVER) to load the chat's model; it
returns None when no mixchat server answers there or the server cannot load that model, so the
app loads the model in-process instead. RemoteEngine implements app/tui/engine.py's Engine
protocol over the server's streamed chat completions:

- stream(): text chunks, then a last chunk with the server's figures (tok/s, memory, expert
  cache hit rate: the `mixchat` field); the server does not send prompt progress;
- cancel(): closes the stream; the server stops that reply within a token;
- count_tokens(): the server's own tokenizer (`POST /v1/mixchat/tokenize`), exact;
- routing: not sent by the server (`last_routing` stays None; the experts panel says so).

If the server goes away mid-reply, stream() raises a one-line MixchatError; the text so far has
already been yielded.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from model.errors import MixchatError

from .client import CONNECT_TIMEOUT, model_field


@dataclass
class RemoteChunk:
    """What model.generate.Chunk carries, as the chat app reads it."""

    text: str
    stats: Any = None
    progress: tuple[int, int] | None = None


@dataclass
class RemoteStats:
    """A reply's figures as the server sent them (GenerationStats' names)."""

    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    context_tokens: int | None = None
    finish_reason: str = ""
    expert_hit_rate: float | None = None


class ServerGone(MixchatError):
    """The server could not be reached, or closed the connection mid-reply."""


class Refused(MixchatError):
    """The server answered with an error (not a mixchat server, a model it cannot load...)."""


class RemoteEngine:
    """The Engine protocol over `mixchat serve` at `url` (one reply at a time, as in-process)."""

    routing_observer = None
    last_routing = None

    def __init__(self, url: str, model: str, api_key: str | None, description: dict):
        self.server = url  # what the status bar shows: replies come from there
        self.model_field = model
        self.api_key = api_key
        self.name: str = description["model"]
        self.context_length: int = description["context_length"]
        self.has_chat_template: bool = description.get("has_chat_template", True)
        self.memory_notice: str = description.get("memory_notice") or ""
        info = description.get("info")
        self.info = SimpleNamespace(**info) if isinstance(info, dict) else None
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._cancelled = False

    # The protocol

    def stream(self, messages: list[dict], settings: Any = None) -> Iterator[RemoteChunk]:
        body = {"model": self.model_field, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        if settings is not None:
            body |= {"max_tokens": settings.max_tokens, "temperature": settings.temperature,
                     "top_p": settings.top_p, "min_p": settings.min_p}  # fmt: skip
            if settings.seed is not None:
                body["seed"] = settings.seed
        with self._lock:
            self._cancelled = False
        return self._stream(body)

    def cancel(self) -> None:
        """Close the reply's stream (thread-safe): the server cancels it at its next token."""
        with self._lock:
            self._cancelled = True
            conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the reading thread at once
            except OSError:
                pass

    def count_tokens(self, messages: list[dict]) -> int:
        return describe(self.server, self.model_field, self.api_key, messages)["prompt_tokens"]

    # Streaming

    def _stream(self, body: dict) -> Iterator[RemoteChunk]:
        conn = open_connection(self.server)
        with self._lock:
            self._conn = conn
            cancelled = self._cancelled
        generated = 0
        try:
            if cancelled:  # Esc before the request went: nothing is asked
                yield RemoteChunk("", RemoteStats(finish_reason="cancelled"))
                return
            try:
                response = post(conn, self.server, "/v1/chat/completions", body, self.api_key)
                if response.status != 200:
                    raise MixchatError(error_message(response, self.server))
                stats = None
                for event in events(response):
                    if "error" in event:
                        if event["error"].get("code") == "shutting_down":
                            raise ServerGone(event["error"].get("message"))
                        raise MixchatError(f"server at {self.server}: "
                                           f"{event['error'].get('message')}")  # fmt: skip
                    for choice in event.get("choices", []):
                        if text := choice.get("delta", {}).get("content"):
                            generated += 1
                            yield RemoteChunk(text)
                    if figures := event.get("mixchat"):
                        stats = remote_stats(figures)
                if stats is None:
                    raise ServerGone(f"the server at {self.server} sent no statistics")
                yield RemoteChunk("", stats)
            except (OSError, http.client.HTTPException, ServerGone) as e:
                if self._cancelled:  # our own close: the reply ends here, as cancelled
                    yield RemoteChunk("", RemoteStats(generation_tokens=generated,
                                                      finish_reason="cancelled"))  # fmt: skip
                    return
                raise ServerGone(
                    f"the server at {self.server} went away mid-reply ({reason(e)}); the text so "
                    "far is kept — start `mixchat serve` again, or use `mixchat chat --local`"
                ) from None
        finally:
            with self._lock:
                self._conn = None
            conn.close()


def reason(error: Exception) -> str:
    return str(error) or type(error).__name__


def remote_stats(figures: dict) -> RemoteStats:
    return RemoteStats(
        prompt_tokens=figures.get("prompt_tokens_prefilled", 0),
        prompt_tps=figures.get("prompt_tps", 0.0),
        generation_tokens=figures.get("generation_tokens", 0),
        generation_tps=figures.get("generation_tps", 0.0),
        peak_memory_gb=figures.get("peak_memory_gb", 0.0),
        context_tokens=figures.get("context_tokens"),
        finish_reason=figures.get("finish_reason", ""),
        expert_hit_rate=figures.get("expert_hit_rate"),
    )


def events(response: http.client.HTTPResponse) -> Iterator[dict]:
    """The JSON bodies of a server-sent event stream, up to `data: [DONE]`."""
    while line := response.readline():
        line = line.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)
    raise ServerGone("the connection closed before the reply ended")


# HTTP (one connection per request: a chat sends a request per reply)


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


def post(conn, url: str, path: str, body: dict, api_key: str | None) -> http.client.HTTPResponse:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn.request("POST", split_url(url).path.rstrip("/") + path, json.dumps(body).encode(), headers)
    return conn.getresponse()


def error_message(response: http.client.HTTPResponse, url: str) -> str:
    try:
        message = json.loads(response.read(1 << 16))["error"]["message"]
    except (OSError, ValueError, KeyError, TypeError):
        message = f"HTTP {response.status}"
    if response.status == 401:
        return f"the server at {url} wants an API key: set MIXCHAT_API_KEY ({message})"
    return f"server at {url}: {message}"


def describe(url: str, model: str, api_key: str | None, messages: list[dict] | None = None
             ) -> dict:  # fmt: skip
    """The server's description of `model` (loading it if need be), with the prompt length of
    `messages` if given. ServerGone when nothing answers; MixchatError for an error answer."""
    conn = open_connection(url)
    try:
        body = {"model": model} | ({"messages": messages} if messages is not None else {})
        try:
            response = post(conn, url, "/v1/mixchat/tokenize", body, api_key)
            if response.status == 401:
                raise MixchatError(error_message(response, url))
            if response.status != 200:
                raise Refused(error_message(response, url))
            return json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise ServerGone(f"the server at {url} did not answer ({reason(e)})") from None
    finally:
        conn.close()


def connect(url: str | None, model: str | None, api_key: str | None) -> RemoteEngine | None:
    """A RemoteEngine for `model` (None: the embedded default) on the server at `url`; None
    when there is no mixchat server there, or it cannot load the model (answer in-process).
    A server that wants another API key is a one-line MixchatError (the user asked for it)."""
    if url is None:
        return None
    field = model_field(model)
    try:
        description = describe(url, field, api_key)
    except (ServerGone, Refused):
        return None  # no server there, not a mixchat server, or it cannot load this model
    if not isinstance(description, dict) or "context_length" not in description:
        return None
    return RemoteEngine(url, field, api_key, description)
