"""`mixchat serve`: keep a model loaded behind a local OpenAI-compatible server (app/serve/)."""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys
from pathlib import Path

from model.generation.limit import DEFAULT_BATCH

from .common import (
    UsageError,
    add_adapter_option,
    add_budget_option,
    add_model_option,
    positive,
    size,
)

DEFAULT_PORT = 8741


def duration(text: str) -> float | None:
    """argparse type of --keep-alive: '5m', '30s', '1h', '90' (seconds), '0' (unload after each
    request), '-1' or 'forever' (never unload) -> seconds, or None for forever."""
    s = text.strip().lower()
    if s in ("-1", "forever", "never", "inf"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(ms|s|m|h)?", s)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h, -1)")
    scale = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="keep a model loaded behind a local OpenAI-compatible server",
        description="Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) "
        "and /health. `mixchat ask` uses a running server (MIXCHAT_SERVER, default "
        f"http://127.0.0.1:{DEFAULT_PORT}) unless --local: without --model it uses the model "
        "the server has loaded; with another --model the server unloads its model and loads "
        "that one, and `ask` says which it replaced.",
    )  # fmt: skip
    add_model_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    add_budget_option(serve)
    add_adapter_option(serve)  # the model it starts with; a request's `adapters` overrides it
    serve.add_argument(
        "--keep-alive", type=duration, default=300.0, metavar="DURATION",
        help="unload the model after this long idle (default 5m; 0: after each request; "
        "-1: never); the next request loads it again",
    )  # fmt: skip
    serve.add_argument(
        "--api-key", metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: the MIXCHAT_API_KEY environment "
        "variable, else none)",
    )  # fmt: skip
    serve.add_argument("--max-queue", type=positive, default=32, metavar="N",
                       help="requests that may wait; beyond, 429 (default 32)")  # fmt: skip
    serve.add_argument("--batch", type=positive, default=None, metavar="N",
                       help=f"requests decoded together in one batch (default {DEFAULT_BATCH} for a "
                       "dense model, 1 for an MoE model; 1: one at a time)")  # fmt: skip
    serve.add_argument("--prompt-cache", type=size, default=1 << 30, metavar="SIZE",
                       help="memory for saved conversation KV caches (default 1GiB)")  # fmt: skip
    serve.add_argument("--safe", action="store_true",
                       help="moderate every chat completion (a request's \"moderation\": false "
                       "turns it off): a flagged prompt or reply ends with finish_reason "
                       "content_filter")  # fmt: skip
    serve.add_argument("--guard-model", metavar="M",
                       help="moderated completions (--safe, or a request's \"moderation\": true) "
                       "also checked with this Llama Guard 3 checkpoint: the prompt, and the "
                       "reply every few sentences and at its end")  # fmt: skip
    serve.add_argument("--detach", action="store_true",
                       help="run in the background (pid and URL in the data directory's "
                       "serve.json, output in serve.log)")  # fmt: skip
    serve.add_argument("--stop", action="store_true",
                       help="stop the background server (--detach) and exit")  # fmt: skip
    serve.add_argument("--state-file", help=argparse.SUPPRESS)  # --detach's server writes it
    serve.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback
            for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        )
    except (OSError, ValueError):
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    if args.stop:
        from app.serve.detach import stop

        return stop(args.settings.data_dir)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, not {args.port}")
    if args.detach:
        from app.serve.detach import detach

        return detach(args.argv, args.settings.data_dir)
    from app.serve.models import ModelManager
    from app.serve.scheduler import Scheduler
    from app.serve.server import bind, build_app, make_server

    api_key = args.api_key or args.settings.api_key
    if not is_loopback(args.host) and api_key is None:
        print(f"mixchat: warning: serving on {args.host} without --api-key: anyone who can reach "
              "this machine can use the model", file=sys.stderr)  # fmt: skip
    sock = bind(args.host, args.port)  # a port in use fails now, before the load
    policy = None
    if args.guard_model:  # loaded (and checked to be a guard) before the chat model
        from app.moderation import Policy

        policy = Policy.build(args.guard_model, args.settings.load_options)
        notice = policy.guards[-1].engine.memory_notice
        if notice:
            print(f"mixchat: guard model: {notice}", file=sys.stderr)
    from app.moderation.policy import chat_load_options

    options, budget_line = chat_load_options(args.settings.load_options, policy)
    if budget_line:
        print(f"mixchat: {budget_line}", file=sys.stderr)
    models = ModelManager(
        args.settings.model, load_options=options,
        keep_alive=args.keep_alive, prompt_cache_bytes=args.prompt_cache,
    )  # fmt: skip
    # Loaded before serving: clients that connect meanwhile wait (in the listen backlog) rather
    # than falling back to loading a second copy in their own process.
    models.engine_for(models.start_key)
    scheduler = Scheduler(models, max_queue=args.max_queue, batch=args.batch)
    host, port = sock.getsockname()[:2]
    print(f"mixchat serve: {models.name(models.start_key)} at http://{host}:{port}/v1 "
          "(Ctrl+C to stop)", file=sys.stderr)  # fmt: skip
    server = make_server(build_app(scheduler, api_key=api_key, safe=args.safe, policy=policy), scheduler)
    from app.serve.detach import remove_state, write_state

    state = Path(args.state_file) if args.state_file else None  # --detach's child
    if state is not None:  # listening and loaded: a client that connects now is answered
        write_state(state, f"http://{host}:{port}", models.name(models.start_key))
    try:
        server.run(sockets=[sock])
    finally:
        if state is not None:
            remove_state(state)
    return 0
