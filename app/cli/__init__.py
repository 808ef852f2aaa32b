"""The `mixchat` command: chat (the default), ask, models, info, download, quantize, compare,
serve, tune, fuse, moderate. Each command is a module with `register(commands)` (its parser)
and its `cmd_*`; only the module of the command that runs is imported, as mlx-lm's cli.py
dispatches (all of them for `mixchat --help`: argparse only, no MLX).

Exit codes: 0 ok, 1 error (one line on stderr), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Sequence

from app.settings import SettingsError, read_settings
from model.errors import MixchatError

from .common import Parser, UsageError, rank_split

# Command -> the module that registers it (quantize/cli.py registers download, quantize and
# compare: quantize does not import app).
COMMANDS = {
    "chat": "app.cli.chat",
    "ask": "app.cli.ask",
    "models": "app.cli.models",
    "info": "app.cli.info",
    "download": "quantize.cli",
    "quantize": "quantize.cli",
    "compare": "quantize.cli",
    "serve": "app.cli.serve",
    "tune": "app.cli.tune",
    "fuse": "quantize.fuse",
    "moderate": "app.cli.moderate",
}
HELP = ("-h", "--help")


def build_parser(command: str | None = None) -> Parser:
    """The parser with `command`'s subparser (None: every command's, for `mixchat --help`)."""
    parser = Parser(prog="mixchat", description="Chat with Mixture-of-Experts models, locally.")
    commands = parser.add_subparsers(dest="command", parser_class=Parser)
    modules = [COMMANDS[command]] if command else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(module).register(commands)
    return parser


def unknown_command(word: str) -> UsageError:
    """`mixchat aks`: the valid commands, and the closest one."""
    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.5)
    hint = f"did you mean `mixchat {close[0]}`? " if close else ""
    return UsageError(f"unknown command {word!r}: {hint}the commands are {', '.join(COMMANDS)} "
                      "(see `mixchat --help`)")  # fmt: skip


def parse(argv: list[str]):
    """The parsed arguments; an unknown option names the help of its own command."""
    parser = build_parser(None if argv[0] in HELP else argv[0])
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} "
                         f"(see `mixchat {args.command} --help`)")  # fmt: skip
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    settings = None
    try:
        if argv and argv[0] not in COMMANDS and argv[0] not in HELP and argv[0][:1] != "-":
            raise unknown_command(argv[0])  # `chat` takes no word: this was meant as a command
        if not argv or (argv[0] not in COMMANDS and argv[0] not in HELP):
            argv.insert(0, "chat")  # `mixchat` alone, or `mixchat --model M`, opens the chat app
        args = parse(argv)
        args.settings = settings = read_settings(args)  # the one read of the environment
        # `serve --detach` runs the same command line in the background; --hosts starts the
        # other ranks with it.
        args.argv = argv
        if args.command in ("ask", "chat") and (split := rank_split(settings)) is not None:
            if not split.world.leader:  # rank 0 leads, this rank follows
                from app.follower import follow

                return follow(settings.model, settings.load_options, split)
        return args.func(args)
    except (UsageError, SettingsError) as e:
        print(f"mixchat: usage error: {e}", file=sys.stderr)
        return 2
    except MixchatError as e:
        print(f"mixchat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmixchat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mixchat ask ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: still one line, unless debugging
        if settings is not None and settings.debug:
            raise
        if distributed := sys.modules.get("model.distributed"):
            distributed.after_failure(e)  # a lost rank: one line from the watchdog
        print(f"mixchat: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
