"""The chat app's engine through a running `mixchat serve` (standard library only: no MLX),
on app/remote.py, the HTTP client `mixchat ask` uses too.

connect() asks the server at settings.server (MIXCHAT_SERVER) to load the chat's model; it
returns None when no mixchat server answers there or the server cannot load that model, so the
app loads the model in-process instead. RemoteEngine implements app/tui/engine.py's Engine
protocol over the server's streamed chat completions:

- stream(): text chunks, then a last chunk with the server's figures (tok/s, memory, expert
  cache hit rate: the `mixchat` field, as a GenerationStats); the server sends no prompt
  progress;
- cancel(): closes the stream; the server stops that reply within a token;
- count_tokens(): the server's own tokenizer (`POST /v1/mixchat/tokenize`), exact;
- routing: not sent by the server (`last_routing` stays None; the experts panel says so).

If the server goes away mid-reply, stream() raises a one-line MixchatError; the text so far has
already been yielded.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from model.errors import MixchatError
from model.stats import GenerationStats

from .remote import (
    CHAT_PATH,
    Refused,
    ReplyStream,
    ServerGone,
    chat_body,
    describe,
    model_field,
    open_connection,
    post,
    reason,
)


def _template_options() -> dict:
    """The chat template variables set around this call (model/tokenizer/hf.py's
    template_options: the chat's Thinking setting), as the server's `chat_template_kwargs`."""
    from model.tokenizer.hf import current_template_options  # no MLX

    return current_template_options()


@dataclass
class RemoteChunk:
    """What model.generate.Chunk carries, as the chat app reads it."""

    text: str
    stats: GenerationStats | None = None
    progress: tuple[int, int] | None = None


class RemoteEngine:
    """The Engine protocol over `mixchat serve` at `url` (one reply at a time, as in-process)."""

    routing_observer = None
    last_routing = None

    def __init__(self, url: str, model: str, api_key: str | None, description: dict,
                 adapter: str | None = None):  # fmt: skip
        self.server = url  # what the status bar shows: replies come from there
        self.adapter_path = adapter  # sent as `adapters` ("": none); None: the server's choice
        self.model_field = model
        self.api_key = api_key
        self.name: str = description["model"]
        self.context_length: int = description["context_length"]
        self.has_chat_template: bool = description.get("has_chat_template", True)
        # The template's thinking switch (Qwen3): the chat's Thinking setting goes to the
        # server as mlx-lm's `chat_template_kwargs`, read from template_options() in stream().
        self.thinking_default: bool | None = description.get("thinking_default")
        self.memory_notice: str = description.get("memory_notice") or ""
        info = description.get("info")
        self.info = SimpleNamespace(**info) if isinstance(info, dict) else None
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._cancelled = False

    # The protocol

    def stream(self, messages: list[dict], settings: Any = None) -> Iterator[RemoteChunk]:
        body = chat_body(self.model_field, messages, settings)
        if options := _template_options():
            body["chat_template_kwargs"] = options
        if self.adapter_path is not None:
            body["adapters"] = self.adapter_path
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
        return describe(self.server, self.model_field, self.api_key, messages,
                        self.adapter_path, _template_options())["prompt_tokens"]  # fmt: skip

    def set_adapter(self, path: str | None) -> None:
        """Use the adapter in `path` (None: none) from now on; the server loads it now, and
        one that it cannot find or apply is a one-line MixchatError."""
        try:
            describe(self.server, self.model_field, self.api_key, None, path or "")
        except Refused as e:
            raise MixchatError(e.message) from None
        self.adapter_path = path or ""

    # Streaming

    def _stream(self, body: dict) -> Iterator[RemoteChunk]:
        conn = open_connection(self.server)
        with self._lock:
            self._conn = conn
            cancelled = self._cancelled
        generated = 0
        try:
            if cancelled:  # Esc before the request went: nothing is asked
                yield RemoteChunk("", GenerationStats(finish_reason="cancelled"))
                return
            try:
                reply = ReplyStream(post(conn, self.server, CHAT_PATH, body, self.api_key),
                                    self.server)  # fmt: skip
                for text in reply:
                    generated += 1
                    yield RemoteChunk(text)
                yield RemoteChunk("", reply.stats)
            except (OSError, http.client.HTTPException, ServerGone) as e:
                if self._cancelled:  # our own close: the reply ends here, as cancelled
                    yield RemoteChunk("", GenerationStats(generation_tokens=generated,
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


def connect(url: str | None, model: str | None, api_key: str | None,
            adapter: str | None = None) -> RemoteEngine | None:  # fmt: skip
    """A RemoteEngine for `model` (None: the embedded default) on the server at `url`; None
    when there is no mixchat server there, or it cannot load the model (answer in-process).
    A server that wants another API key is a one-line MixchatError (the user asked for it)."""
    if url is None:
        return None
    field = model_field(model)
    try:
        description = describe(url, field, api_key, adapter=adapter)
    except ServerGone:
        return None  # no server there
    except Refused as e:
        if e.status == 401:
            raise MixchatError(str(e)) from None
        return None  # not a mixchat server, or it cannot load this model
    if not isinstance(description, dict) or "context_length" not in description:
        return None
    return RemoteEngine(url, field, api_key, description, adapter)
