"""Per-chat settings: system prompt, sampling, reply length, reply language, safe mode; and\nthe model's LoRA adapter (for every chat: the engine applies it)."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Switch, TextArea

from app.i18n import REPLY_LANGUAGES, Strings
from app.store import ChatSettings

DECIMAL_CHARS = r"[0-9.,]*"  # what a decimal field accepts: "0.5" and "0,5" alike


def parse_decimal(text: str) -> float:
    """'0,5' or '0.5' -> 0.5; ValueError for anything else."""
    text = text.strip().replace(",", ".")
    if text.count(".") > 1 or not text.replace(".", "").isdigit():
        raise ValueError(text)
    return float(text)


def decimal_text(value: float, strings: Strings) -> str:
    """0.7 -> '0.7' (English) or '0,7' (French)."""
    text = f"{value:g}"
    return text.replace(".", ",") if strings.language == "fr" else text


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """Dismisses with the edited settings, or None when cancelled."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save", priority=True),
    ]

    def __init__(
        self,
        settings: ChatSettings,
        strings: Strings,
        adapter_path: str = "",
        thinking_switch: bool = False,
    ) -> None:
        super().__init__(classes="dialog-screen")
        self.settings = settings
        self.strings = strings
        # The model's chat template turns thinking on and off (Qwen3's enable_thinking).
        self.thinking_switch = thinking_switch
        # The model's LoRA adapter ("": none); once saved, what the user asked for.
        self.adapter_path = adapter_path

    def compose(self) -> ComposeResult:
        t = self.strings
        settings = self.settings
        language_options = [(t("settings.reply_language.any"), "")] + [
            (native, code) for code, (_english, native) in REPLY_LANGUAGES.items()
        ]
        with Vertical(id="settings-dialog", classes="dialog"):
            yield Label(t("settings.title"), classes="dialog-title")
            with VerticalScroll(classes="dialog-body"):
                yield Label(t("settings.system_prompt"), classes="field-label")
                yield TextArea(settings.system_prompt, id="system-prompt", soft_wrap=True)
                with Horizontal(classes="field-row"):
                    with Vertical(classes="field"):
                        yield Label(t("settings.temperature"), classes="field-label")
                        yield Input(
                            decimal_text(settings.temperature, t),
                            id="temperature",
                            restrict=DECIMAL_CHARS,
                        )
                    with Vertical(classes="field"):
                        yield Label(t("settings.top_p"), classes="field-label")
                        yield Input(
                            decimal_text(settings.top_p, t), id="top-p", restrict=DECIMAL_CHARS
                        )
                    with Vertical(classes="field"):
                        yield Label(t("settings.max_tokens"), classes="field-label")
                        yield Input(str(settings.max_tokens), id="max-tokens", type="integer")
                with Horizontal(classes="field-row"):
                    with Vertical(classes="field wide-field"):
                        yield Label(t("settings.reply_language"), classes="field-label")
                        yield Select(
                            language_options,
                            value=settings.reply_language
                            if settings.reply_language in REPLY_LANGUAGES
                            else "",
                            allow_blank=False,
                            id="reply-language",
                        )
                    with Vertical(classes="field"):
                        yield Label(t("settings.safe_mode"), classes="field-label")
                        yield Switch(settings.safe_mode, id="safe-mode")
                if self.thinking_switch:  # its own row: room for the labels at 80 columns
                    with Horizontal(classes="field-row"):
                        with Vertical(classes="field"):
                            yield Label(t("settings.thinking"), classes="field-label")
                            yield Switch(settings.thinking, id="thinking")
                yield Label(t("settings.adapter_path"), classes="field-label")
                yield Input(self.adapter_path, id="adapter-path")
            yield Label("", id="settings-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button(t("settings.save"), variant="primary", id="save")
                yield Button(t("settings.cancel"), id="cancel")

    def on_mount(self) -> None:
        self.query_one("#system-prompt", TextArea).focus()

    def read_settings(self) -> ChatSettings | str:
        """The settings in the form, or the label of the first invalid field."""
        t = self.strings
        try:
            temperature = parse_decimal(self.query_one("#temperature", Input).value)
            if not 0.0 <= temperature <= 2.0:
                raise ValueError
        except ValueError:
            return t("settings.temperature")
        try:
            top_p = parse_decimal(self.query_one("#top-p", Input).value)
            if not 0.0 < top_p <= 1.0:
                raise ValueError
        except ValueError:
            return t("settings.top_p")
        try:
            max_tokens = int(self.query_one("#max-tokens", Input).value)
            if max_tokens < 1:
                raise ValueError
        except ValueError:
            return t("settings.max_tokens")
        adapter = self.query_one("#adapter-path", Input).value.strip()
        if adapter and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
            return t("settings.adapter_path")
        self.adapter_path = str(Path(adapter).expanduser().resolve()) if adapter else ""
        language = self.query_one("#reply-language", Select).value
        return ChatSettings(
            system_prompt=self.query_one("#system-prompt", TextArea).text,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            reply_language=language if isinstance(language, str) else "",
            safe_mode=self.query_one("#safe-mode", Switch).value,
            thinking=self.query_one("#thinking", Switch).value
            if self.thinking_switch
            else self.settings.thinking,
        )

    def action_save(self) -> None:
        result = self.read_settings()
        if isinstance(result, str):
            self.query_one("#settings-error", Label).update(
                self.strings("settings.invalid", field=result)
            )
            return
        self.dismiss(result)

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    def _save_pressed(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()
