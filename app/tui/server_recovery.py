"""A chat whose `mixchat serve` went away (app/remote_engine.py raised ServerGone), mid-reply or
between replies: the chat forgets that engine (the status bar drops the server's address and
says what happens next), and the next message (at once, for a message the dead server never
answered) waits while the app's loader runs again: the server if it is back, else the model
in-process, which the status bar then says in one line. A mixin of the chat screen."""

from __future__ import annotations

from typing import Any

from app.i18n import Strings
from app.store import StoredMessage
from app.tui.engine import Engine
from app.tui.errors import describe_error
from app.tui.widgets.reply_flow import ReplyFlow
from app.tui.widgets.status_bar import StatusBar


def server_of(engine: Any) -> str | None:
    """The server an engine replies from, as the status bar writes it (None: in-process)."""
    server = getattr(engine, "server", None)
    return server.split("://", 1)[-1].rstrip("/") if server else None


class ServerRecovery:
    """What the chat screen does when its server went away (a mixin: ``ChatScreen`` provides
    the state below and ``engine``, ``start_reply``, ``engine_ready``,
    ``chat_log``, and Textual's ``app``, ``notify``, ``run_worker``, ``refresh_bindings``)."""

    strings: Strings
    history: list[StoredMessage]
    reply_flow: ReplyFlow
    status_bar: StatusBar
    lost_server: str | None = None  # the server that went away, until an engine is back
    recovering: bool = False

    def server_went_away(self, error: BaseException | None) -> bool:
        from app.remote import Refused, ServerGone  # standard library only: no MLX

        shutting_down = isinstance(error, Refused) and error.code == "shutting_down"
        gone = isinstance(error, ServerGone) or shutting_down  # stopped before the reply began
        return gone and server_of(self.engine) is not None

    async def forget_server(self, *, retry: bool) -> None:
        """The engine's server is gone: no reply goes to it any more. ``retry``: the last
        message got no reply at all: it goes again as soon as an engine is back."""
        engine = self.engine
        assert engine is not None
        self.lost_server = server_of(engine)
        self.reply_flow.engine_gone()
        self.status_bar.set_model(engine.name, engine.context_length)
        self.status_bar.set_state(self.strings("status.server_gone"))
        if retry and self.history and self.history[-1].role == "user":
            await self.start_reply()

    def recover_engine(self) -> None:
        """Run the app's loader again (in a thread) for the reply now waiting."""
        if self.lost_server is None or self.recovering:
            return
        self.recovering = True
        self.status_bar.set_state(self.strings("status.reconnecting"))
        self.run_worker(self._reload, thread=True, group="reload", exit_on_error=False)

    def _reload(self) -> None:
        try:
            engine = self.app.reload_engine()
        except Exception as error:  # one line in the chat, never a traceback
            self.app.call_from_thread(self._reload_failed, describe_error(error))
        else:
            self.app.call_from_thread(self._reloaded, engine)

    async def _reloaded(self, engine: Engine) -> None:
        self.lost_server, self.recovering = None, False
        await self.engine_ready(engine, announce=True)
        if server_of(engine) is None:  # loaded here: the status bar says why, in one line
            label = self.strings("status.loaded_here", name=engine.name)
            self.status_bar.set_model(label, engine.context_length)

    async def _reload_failed(self, detail: str) -> None:
        self.recovering = False
        waiting = self.reply_flow.cancel()  # the message that waited stays in the chat
        if waiting is not None:
            await waiting.view.remove()
        self.status_bar.set_state(self.strings("status.no_model"))
        text = self.strings("notice.model_failed", error=detail)
        await self.chat_log.add_notice(text, kind="error")
        self.refresh_bindings()
