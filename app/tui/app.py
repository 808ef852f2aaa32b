"""The Textual application: owns the store, the interface language and the engine's loading."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from textual import work
from textual.app import App, SystemCommand
from textual.screen import Screen

from app.store import ConversationStore
from app.tui.actions import CHAT_ACTIONS
from app.tui.errors import describe_error
from app.tui.i18n import Strings, resolve_language
from app.tui.screens.chat import ChatScreen

EngineLoader = Callable[[], Any]


class MixchatApp(App[int]):
    """Chat with a local model.

    Give it either a ready ``engine`` (tests, benchmarks) or an ``engine_loader`` that builds
    one: the loader runs in a thread while the chat screen already shows, with a loading state.
    If loading fails, the app exits with code 1 and the error as its exit message.
    """

    CSS_PATH = "mixchat.tcss"
    TITLE = "mixchat"

    def __init__(
        self,
        *,
        store: ConversationStore,
        engine: Any = None,
        engine_loader: EngineLoader | None = None,
        lang: str | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.strings = Strings(resolve_language(lang))
        self._engine = engine
        self._engine_loader = engine_loader
        self.chat_screen = ChatScreen(store, self.strings)
        self.load_error: str | None = None

    @property
    def engine(self) -> Any:
        return self._engine

    async def on_mount(self) -> None:
        await self.push_screen(self.chat_screen)
        if self._engine is not None:
            await self.chat_screen.engine_ready(self._engine)
        elif self._engine_loader is not None:
            self._load_engine()

    @work(thread=True, exit_on_error=False, group="load")
    def _load_engine(self) -> None:
        assert self._engine_loader is not None
        try:
            engine = self._engine_loader()
        except Exception as error:  # the message goes to the user, not a traceback
            self.call_from_thread(self._engine_failed, describe_error(error))
        else:
            self.call_from_thread(self._engine_loaded, engine)

    async def _engine_loaded(self, engine: Any) -> None:
        self._engine = engine
        await self.chat_screen.engine_ready(engine, announce=True)

    async def _engine_failed(self, detail: str) -> None:
        self.load_error = detail
        await self.chat_screen.engine_failed(detail)
        self.exit(1, return_code=1, message=self.strings("notice.model_failed", error=detail))

    async def action_quit(self) -> None:
        self.chat_screen.save_partial_reply_now()
        self.exit(0)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The chat's actions in the command palette (Ctrl+P), in the interface language."""
        if screen is self.chat_screen:
            t = self.strings
            for action in CHAT_ACTIONS:
                yield SystemCommand(
                    f"{t(action.label_key)} ({action.key_display})",
                    t(action.help_key),
                    partial(screen.run_action, action.name),
                )
        yield from super().get_system_commands(screen)
