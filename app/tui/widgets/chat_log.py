"""The scrolling list of messages and notices of the open chat."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static

from app.tui.widgets.message_view import MessageView


class ChatLog(VerticalScroll, can_focus=True):
    """Messages top to bottom. Anchored: it follows new text while the view is at the bottom,
    and stays put once the user scrolls up (until they scroll back down)."""

    def on_mount(self) -> None:
        self.anchor()

    async def add_message(self, view: MessageView) -> MessageView:
        await self.mount(view)
        return view

    async def add_notice(
        self,
        text: str,
        *,
        kind: str = "info",
        before: MessageView | None = None,
        classes: str = "",
    ) -> Static:
        """A line that is not a message (context trimmed, an error), at the end or ``before``."""
        notice = Static(text, classes=f"notice -{kind} {classes}".strip(), markup=False)
        if before is not None and before.parent is self:
            await self.mount(notice, before=before)
        else:
            await self.mount(notice)
        return notice

    async def show_welcome(self, markdown: str) -> None:
        await self.mount(Markdown(markdown, classes="welcome"))

    async def clear(self) -> None:
        await self.remove_children()

    def follow(self) -> None:
        """Scroll to the bottom and follow new text again (after the user sends something)."""
        self.anchor()

    @property
    def message_views(self) -> list[MessageView]:
        return list(self.query_children(MessageView))

    def last_message(self, role: str) -> MessageView | None:
        for view in reversed(self.message_views):
            if view.role == role:
                return view
        return None

    async def remove_from(self, view: MessageView) -> None:
        """Remove a message and everything shown after it."""
        children = list(self.children)
        if view not in children:
            return
        await self.remove_children(children[children.index(view) :])
