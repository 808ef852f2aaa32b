"""`mixchat ask` through a running `mixchat serve` (standard library only: no MLX, no mlx_lm).

ask_server() sends the request to settings.server (default http://127.0.0.1:8741) and streams
the reply exactly as the in-process path prints it. It returns None, so the caller answers
in-process, when no mixchat server answers there or the server cannot load the model.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

from model.errors import MixchatError

CONNECT_TIMEOUT = 1.0  # seconds; a loopback server that is not there refuses at once


def model_field(model: str | None) -> str:
    """What the server should load: a local path made absolute (the server's working directory
    is not ours), else the name or repo id as given."""
    if not model:  # the embedded default, as in-process (not the server's own "default")
        from model.registry import DEFAULT_MODEL

        return DEFAULT_MODEL
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def ask_server(args: argparse.Namespace, messages: list[dict]) -> int | None:
    """Answer `mixchat ask` through the server; None when there is none to use."""
    url = args.settings.server
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MixchatError(f"the server setting is not an http URL: {url!r}")
    body = {
        "model": model_field(args.settings.model),
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temp,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.seed is not None:
        body["seed"] = args.seed
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if key := args.settings.api_key:
        headers["Authorization"] = f"Bearer {key}"
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                timeout=CONNECT_TIMEOUT)  # fmt: skip
    try:
        conn.connect()
    except OSError:
        return None  # no server: answer in-process
    try:
        conn.sock.settimeout(None)  # a long prefill may come before the first byte
        path = parts.path.rstrip("/") + "/v1/chat/completions"
        try:
            conn.request("POST", path, json.dumps(body).encode(), headers)
            response = conn.getresponse()
        except OSError:
            return None  # it closed at once: not a server we can use
        if response.status != 200:
            return failure(response, url)
        return print_reply(response, args, url)
    finally:
        conn.close()


def failure(response: http.client.HTTPResponse, url: str) -> int | None:
    """A non-200 answer: None (answer in-process) if this is not a mixchat server or it cannot
    load the model; else the server's one-line error as the in-process path would raise it."""
    try:
        error = json.loads(response.read(1 << 16))["error"]
        message, code = error["message"], error.get("code")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not an OpenAI-style server answer
    if response.status == 404:
        return None
    if response.status == 400 and code == "invalid_value":
        from app.cli import UsageError

        raise UsageError(message)
    if response.status == 401:
        raise MixchatError(
            f"the server at {url} wants an API key: set MIXCHAT_API_KEY ({message})"
        )
    raise MixchatError(message if response.status == 400 else f"server at {url}: {message}")


def events(response: http.client.HTTPResponse):
    """The JSON bodies of a server-sent event stream, up to `data: [DONE]`."""
    while line := response.readline():
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)
    raise MixchatError("the server closed the connection before the reply ended")


def print_reply(response: http.client.HTTPResponse, args: argparse.Namespace, url: str) -> int:
    """Stream the reply to stdout and the statistics to stderr, as the in-process path does."""
    text, stats, model = [], None, None
    try:
        for body in events(response):
            if "error" in body:
                raise MixchatError(f"server at {url}: {body['error'].get('message')}")
            for choice in body.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                text.append(piece)
                if piece and not args.json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            stats = body.get("mixchat") or stats
            model = body.get("model") or model
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise MixchatError(f"the reply from {url} broke off: {e}") from None
    if stats is None:
        raise MixchatError(f"the server at {url} sent no statistics")
    if stats["memory_notice"]:  # always said, in one line, as in-process
        print(f"mixchat: {stats['memory_notice']}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "text": "".join(text),
            "prompt_tokens": stats["prompt_tokens_prefilled"],
            "generation_tokens": stats["generation_tokens"],
            "prompt_tps": stats["prompt_tps"],
            "generation_tps": stats["generation_tps"],
            "peak_memory_gb": stats["peak_memory_gb"],
            "finish_reason": stats["finish_reason"],
            "model": model,
            "expert_hit_rate": stats["expert_hit_rate"],
            "bytes_read_per_token": stats["bytes_read_per_token"],
            "prompt_bytes_read_per_token": stats["prompt_bytes_read_per_token"],
            "load_seconds": stats["load_seconds"],
            "compute_seconds": stats["compute_seconds"],
        }, ensure_ascii=False))  # fmt: skip
        return 0
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        from app.cli import stats_lines

        fields = ("prompt_tps", "generation_tokens", "generation_tps", "peak_memory_gb",
                  "finish_reason", "expert_hit_rate", "bytes_read_per_token", "load_seconds",
                  "compute_seconds")  # fmt: skip
        seen = SimpleNamespace(prompt_tokens=stats["prompt_tokens_prefilled"],
                               **{name: stats[name] for name in fields})  # fmt: skip
        for line in stats_lines(seen, args.settings.lang):
            print(line, file=sys.stderr)
    return 0
