"""Every action of the chat screen in one table: its keys, whether the footer shows it, and the
i18n keys of its label (``action.<name>``) and help text (``command.<name>``).

The chat screen's bindings, the help screen and the command palette are all built from it, so
they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from textual.binding import Binding
from textual.dom import DOMNode

from app.i18n import Strings


@dataclass(frozen=True)
class ChatAction:
    name: str  # ChatScreen.action_<name>
    keys: str  # Textual key names, comma-separated
    key_display: str  # how the help screen writes the keys
    in_footer: bool = True
    priority: bool = False

    @property
    def label_key(self) -> str:
        return f"action.{self.name}"

    @property
    def help_key(self) -> str:
        return f"command.{self.name}"


CHAT_ACTIONS: tuple[ChatAction, ...] = (
    ChatAction("cancel", "escape", "Esc"),
    # Shown only while safe mode holds a message back (ChatScreen.check_action).
    ChatAction("send_anyway", "ctrl+g", "Ctrl+G"),
    ChatAction("new_chat", "ctrl+n", "Ctrl+N"),
    ChatAction("regenerate", "ctrl+r", "Ctrl+R"),
    ChatAction("edit_last", "ctrl+l", "Ctrl+L"),
    ChatAction("copy_reply", "ctrl+o", "Ctrl+O"),
    ChatAction("settings", "ctrl+s", "Ctrl+S", priority=True),
    ChatAction("toggle_experts", "f4", "F4"),
    ChatAction("toggle_sidebar", "ctrl+b", "Ctrl+B", in_footer=False),
    ChatAction("help", "f1", "F1"),
    ChatAction("rename_chat", "f2", "F2", in_footer=False),
    ChatAction("model_info", "f3", "F3", in_footer=False),
    ChatAction("export_chat", "f9", "F9", in_footer=False),
    ChatAction("delete_chat", "f8", "F8", in_footer=False),
    # Ctrl+C: what a terminal user presses to stop something; it never quits (Ctrl+Q does).
    ChatAction("interrupt", "ctrl+c", "Ctrl+C", in_footer=False, priority=True),
)

# Keys handled elsewhere (the prompt box, the app), listed on the help screen.
OTHER_KEYS: tuple[tuple[str, str], ...] = (
    ("Enter", "help.send"),
    ("Shift+Enter, Ctrl+J", "help.newline"),
    ("Tab, Shift+Tab", "help.focus"),
    ("Ctrl+P", "help.palette_key"),
    ("Ctrl+Q", "help.quit"),
)


def chat_bindings() -> list[Binding]:
    """Bindings whose descriptions are i18n keys; ``translate_bindings`` makes them readable."""
    return [
        Binding(
            action.keys,
            action.name,
            action.label_key,
            show=action.in_footer,
            priority=action.priority,
        )
        for action in CHAT_ACTIONS
    ]


def translate_bindings(node: DOMNode, strings: Strings) -> None:
    """Replace i18n keys in a node's binding descriptions by their text in ``strings``."""
    bindings_map = node._bindings
    for key, bindings in list(bindings_map.key_to_bindings.items()):
        bindings_map.key_to_bindings[key] = [
            replace(binding, description=strings(binding.description))
            if binding.description.startswith("action.")
            else binding
            for binding in bindings
        ]


def help_rows(strings: Strings) -> list[tuple[str, str]]:
    """(keys, what they do) for the help screen, chat actions first."""
    rows = [
        (strings.key_name(action.key_display), strings(action.help_key)) for action in CHAT_ACTIONS
    ]
    rows += [(strings.key_name(keys), strings(text_key)) for keys, text_key in OTHER_KEYS]
    return rows
