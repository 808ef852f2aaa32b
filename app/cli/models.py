"""`mixchat models`: list the models mixchat can find."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="list the models mixchat can find")
    models.add_argument("--json", action="store_true",
                        help="print one JSON list of {name, source, path} instead")
    models.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from model.registry import list_models

    entries = list_models(args.settings.data_dir)
    if args.json:
        rows = [{"name": e.name, "source": e.source, "path": str(e.path)} for e in entries]
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    width = max((len(e.name) for e in entries), default=4)
    for entry in entries:
        print(f"{entry.name:<{width}}  {entry.source:<9}  {entry.path}")
    return 0
