"""`mixchat ask` through a running `mixchat serve` (standard library only: no MLX, no mlx_lm).

ask_server() sends the request to settings.server (default http://127.0.0.1:8741) with
app/remote.py, the chat app's client too, and prints the reply exactly as the in-process path
does. It returns None, so the caller answers in-process, when no mixchat server answers there or
the server cannot load the model.
"""

from __future__ import annotations

import argparse
import http.client
import sys
from dataclasses import replace

from app.remote import (
    CHAT_PATH,
    SERVER_MODEL,
    Refused,
    ReplyStream,
    ServerGone,
    chat_body,
    model_field,
    open_connection,
    post,
)
from model.errors import MixchatError
from model.generation_settings import GenerationSettings

from .common import UsageError, print_end, print_flagged, print_reply


def ask_server(args: argparse.Namespace, messages: list[dict],
               generation: GenerationSettings) -> int | None:  # fmt: skip
    """Answer `mixchat ask` through the server; None when there is none to use."""
    url = args.settings.server
    if url is None:
        return None
    try:
        conn = open_connection(url)  # a setting that is not an http URL: a MixchatError
    except ServerGone:
        return None  # no server: answer in-process
    try:
        # Without --model: the model the server has loaded (it is not swapped for the default).
        model = model_field(args.settings.model) if args.settings.model else SERVER_MODEL
        body = chat_body(model, messages, generation)
        if getattr(args, "think", None) is not None:  # as mlx-lm's server takes it
            body["chat_template_kwargs"] = {"enable_thinking": args.think}
        if args.settings.adapter_path:  # the server applies it, as mlx-lm's server does
            body["adapters"] = args.settings.adapter_path
        try:
            response = post(conn, url, CHAT_PATH, body, args.settings.api_key)
        except OSError:
            return None  # it closed at once: not a server we can use
        except Refused as refused:
            return failure(refused)
        return print_answer(ReplyStream(response, url), args, url)
    finally:
        conn.close()


def failure(refused: Refused) -> int | None:
    """An error answer: None (answer in-process) if this is not a mixchat server or it cannot
    load the model; else the server's one-line error as the in-process path would raise it."""
    if not refused.openai or refused.status == 404:
        return None
    if refused.status == 400 and refused.code == "invalid_value":
        raise UsageError(refused.message)
    if refused.status == 400:
        raise MixchatError(refused.message)
    raise refused  # "server at URL: ...", or the API key it wants


def print_answer(reply: ReplyStream, args: argparse.Namespace, url: str) -> int:
    """Stream the reply to stdout and the statistics to stderr, as the in-process path does."""
    try:
        text = print_reply(reply, args, guard := getattr(args, "reply_guard", None))
        if guard is not None and guard.result is not None:  # --safe: the reply was flagged
            return print_flagged(text, guard.result, args)  # the connection closes: the
            # server cancels the reply
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise MixchatError(f"the reply from {url} broke off: {e}") from None
    if reply.replaced_model:  # --model named another model than the server's: it was swapped
        print(f"mixchat: the server at {url} unloaded {reply.replaced_model} to load "
              f"{reply.model}", file=sys.stderr)  # fmt: skip
    if reply.memory_notice:  # always said, in one line, as in-process
        print(f"mixchat: {reply.memory_notice}", file=sys.stderr)
    stats = reply.stats
    if reply.prompt_tokens is not None:  # the whole prompt, as in-process (not only the
        stats = replace(stats, prompt_tokens=reply.prompt_tokens)  # tokens it had not cached)
    return print_end(text, reply.model, stats, args)
