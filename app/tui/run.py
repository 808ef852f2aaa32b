"""``run_chat``: open the chat app on its store, what ``mixchat chat`` (app/cli/chat.py) calls."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.load_options import LoadOptions


def run_chat(
    model: str | None = None,
    lang: str | None = None,
    *,
    load_options: LoadOptions | None = None,
    data_dir: str | Path | None = None,
    server: str | None = None,
    api_key: str | None = None,
    moderation: Any = None,
) -> int:
    """Open the chat UI on ``model`` (None: the embedded default model); returns an exit code.

    The window opens at once; the model loads in a thread behind a visible loading state.
    ``lang`` (``en``, ``fr``…) overrides the language taken from LC_ALL / LC_MESSAGES / LANG.
    ``load_options`` (model.load_options.LoadOptions) go to ``Engine.load``; the chats live in
    ``data_dir`` (None: the default data directory). With ``server`` (a URL), a running
    `mixchat serve` there answers, if it can serve the model (``api_key`` sent as its key).
    ``moderation`` (app.tui.moderation.ChatModeration): safe mode's checks.
    app/settings.py reads them all once. A second app on the same data directory is refused
    with one line (exit code 1).
    """
    from app.settings import data_dir as default_data_dir
    from app.store import DATABASE_NAME, ConversationStore
    from app.tui.app import MixchatApp
    from model.errors import MixchatError

    try:
        directory = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        store = ConversationStore(directory / DATABASE_NAME)
    except MixchatError as error:  # another mixchat on this data dir, a newer schema
        print(f"mixchat: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # an unwritable data directory, a broken database
        print(f"mixchat: error: cannot open the conversation store: {error}", file=sys.stderr)
        return 1

    app = MixchatApp(
        store=store,
        lang=lang,
        model=model,
        load_options=load_options,
        server=server,
        api_key=api_key,
        moderation=moderation,
    )
    try:
        app.run()
    finally:
        store.close()
    if app.return_code is not None:
        return app.return_code
    return 0
