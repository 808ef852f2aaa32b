"""The Textual application: owns the store, the interface language and the engine's loading."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.command import CommandPalette
from textual.screen import Screen
from textual.theme import ThemeProvider

from app.i18n import Strings, resolve_language, unsupported_language
from app.settings import read_settings
from app.store import ConversationStore
from app.tui.actions import CHAT_ACTIONS
from app.tui.engine import Engine
from app.tui.errors import describe_error
from app.tui.moderation import ChatModeration
from app.tui.screens.chat import ChatScreen
from model.load_options import LoadOptions

EngineLoader = Callable[[], Engine]


class MixchatApp(App[int]):
    """Chat with a local model.

    Give it either a ready ``engine`` (tests, benchmarks), an ``engine_loader`` that builds
    one, or neither: then it uses the `mixchat serve` at ``server`` (with ``api_key``) if one
    answers there and serves ``model``, else loads ``model`` (None: the embedded default) as
    ``load_options`` (a model.load_options.LoadOptions; None: the defaults) say. The loader
    runs in a thread while the chat screen already shows, with a loading state; a message sent
    meanwhile waits and goes when the model is ready. If loading fails, the app exits with code
    1 and the error as its exit message. ``moderation`` (app/tui/moderation.py): safe mode's
    checks (None: the lexical guard, for chats whose safe-mode switch is on).
    """

    CSS_PATH = "mixchat.tcss"
    TITLE = "mixchat"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (60, "-normal"), (120, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-tiny"), (16, "-short"), (30, "-tall")]

    def __init__(
        self,
        *,
        store: ConversationStore,
        engine: Engine | None = None,
        engine_loader: EngineLoader | None = None,
        lang: str | None = None,
        model: str | None = None,
        load_options: LoadOptions | None = None,
        server: str | None = None,
        api_key: str | None = None,
        moderation: ChatModeration | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        # No lang: the locale's, as app/settings.py reads it (an unknown lang: English).
        self.strings = Strings(resolve_language(lang, {}) if lang else read_settings().lang)
        self._unsupported_lang = lang if unsupported_language(lang) else None
        self._engine = engine
        if engine is None and engine_loader is None:
            engine_loader = partial(_load_engine, model, load_options, server, api_key)
        self._engine_loader = engine_loader if engine is None else None
        self.chat_screen = ChatScreen(store, self.strings, moderation)
        self.load_error: str | None = None

    @property
    def engine(self) -> Engine | None:
        return self._engine

    async def on_mount(self) -> None:
        await self.push_screen(self.chat_screen)
        if self._unsupported_lang:
            self.notify(
                self.strings("notice.unknown_language", lang=self._unsupported_lang),
                severity="warning",
                timeout=8,
            )
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

    async def _engine_loaded(self, engine: Engine) -> None:
        self._engine = engine
        await self.chat_screen.engine_ready(engine, announce=True)

    def reload_engine(self) -> Engine:
        """Build the engine again, as at start-up (from a worker thread: the chat screen's, after
        its server went away): that server if it answers again, else the model in-process."""
        if self._engine_loader is None:
            raise RuntimeError("this app was given its engine: there is none to load again")
        self._engine = self._engine_loader()
        return self._engine

    async def _engine_failed(self, detail: str) -> None:
        self.load_error = detail
        await self.chat_screen.engine_failed(detail)
        self.exit(1, return_code=1, message=self.strings("notice.model_failed", error=detail))

    async def action_quit(self) -> None:
        self.chat_screen.save_partial_reply_now()
        self.exit(0)

    def action_help_quit(self) -> None:
        """Ctrl+C outside the chat screen (dialogs): say how to quit, in the interface language."""
        self.notify(self.strings("notify.how_to_quit"))

    # Keys as the interface language names them (footer, key panel)

    def get_key_display(self, binding: Binding) -> str:
        display = super().get_key_display(binding)
        if display[:1] == "f" and display[1:].isdigit():
            return display.upper()  # F4, as keyboards print it
        if display in ("esc", "enter"):  # Esc / Échap, as the help screen writes them
            return self.strings.key_name(display.capitalize())
        return display

    # The command palette, every entry and its placeholder in the interface language

    def action_command_palette(self) -> None:
        if self.use_command_palette and not CommandPalette.is_open(self):
            self.push_screen(
                CommandPalette(
                    placeholder=self.strings("palette.placeholder"), id="--command-palette"
                )
            )

    def search_themes(self) -> None:
        self.push_screen(
            CommandPalette(
                providers=[ThemeProvider], placeholder=self.strings("system.theme_placeholder")
            )
        )

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The chat's actions, then Textual's own commands, all in the interface language
        (Textual's are rewritten here rather than inherited in English)."""
        t = self.strings
        if screen is self.chat_screen:
            for action in CHAT_ACTIONS:
                yield SystemCommand(
                    f"{t(action.label_key)} ({t.key_name(action.key_display)})",
                    t(action.help_key),
                    partial(screen.run_action, action.name),
                )
        yield SystemCommand(t("system.theme"), t("system.theme.help"), self.action_change_theme)
        yield SystemCommand(t("system.quit"), t("system.quit.help"), self.action_quit)
        if screen.query("HelpPanel"):
            yield SystemCommand(t("system.keys"), t("system.keys.hide"), self.action_hide_help_panel)
        else:
            yield SystemCommand(t("system.keys"), t("system.keys.help"), self.action_show_help_panel)
        if screen.maximized is not None:
            yield SystemCommand(
                t("system.minimize"), t("system.minimize.help"), screen.action_minimize
            )
        elif screen.focused is not None and screen.focused.allow_maximize:
            yield SystemCommand(
                t("system.maximize"), t("system.maximize.help"), screen.action_maximize
            )
        yield SystemCommand(
            t("system.screenshot"),
            t("system.screenshot.help"),
            lambda: self.set_timer(0.1, self.deliver_screenshot),
        )


def _load_engine(
    model: str | None, options: LoadOptions | None, server: str | None = None,
    api_key: str | None = None,
) -> Engine:  # fmt: skip
    """The engine of a running `mixchat serve` at ``server`` if one answers there and serves
    the model (app/remote_engine.py, no MLX), else ``Engine.load`` (MLX is imported here, in
    the loading thread), this rank's part when the ranks were joined at start-up."""
    from app.remote_engine import connect

    adapter = options.adapter_path if options is not None else None
    if (remote := connect(server, model, api_key, adapter)) is not None:
        return remote
    from model.distributed import rank_split
    from model.generate import Engine as ModelEngine

    return ModelEngine.load(model, options, split=rank_split())
