"""mixchat's terminal interface. ``run_chat`` is what ``mixchat`` (app/cli.py) calls."""

from __future__ import annotations

import sys
from pathlib import Path


def run_chat(
    model: str | None = None,
    lang: str | None = None,
    *,
    data_dir: Path | None = None,
    **engine_options,
) -> int:
    """Open the chat UI on ``model`` (None: the embedded default model); returns an exit code.

    The window opens at once; the model loads in a thread behind a visible loading state.
    ``lang`` (``en``, ``fr``…) overrides the language taken from LC_ALL / LC_MESSAGES / LANG.
    ``engine_options`` (dtype, memory_budget, max_context, kv_bits, streams) go to
    ``Engine.load``; the chats live in ``data_dir`` (None: the default data directory).
    app/settings.py reads them all once.
    """
    from app.store import DATABASE_NAME, ConversationStore
    from app.tui.app import MixchatApp
    from model.registry import data_dir as default_data_dir

    try:
        store = ConversationStore((data_dir or default_data_dir()) / DATABASE_NAME)
    except Exception as error:  # an unwritable data directory, a broken database
        print(f"mixchat: cannot open the conversation store: {error}", file=sys.stderr)
        return 1

    def load_engine():
        from model import Engine

        return Engine.load(model, **engine_options)

    app = MixchatApp(store=store, engine_loader=load_engine, lang=lang)
    try:
        app.run()
    finally:
        store.close()
    if app.return_code is not None:
        return app.return_code
    return 0


__all__ = ["run_chat"]
