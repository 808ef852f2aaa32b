"""The interface language and its strings: which language (from an explicit choice or the
locale variables, given as a mapping: nothing here reads the environment) and ``Strings``.

The language comes from an explicit ``lang`` argument, else from the locale variables in POSIX
order of precedence (LC_ALL, then LC_MESSAGES, then LANG): ``fr_FR.UTF-8`` gives French.
app/settings.py resolves it once, passing the environment in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from model.sizes import format_bytes, format_number

from .en import ENGLISH
from .fr import FRENCH

DEFAULT_LANGUAGE = "en"
TABLES: dict[str, dict[str, str]] = {"en": ENGLISH, "fr": FRENCH}

# Names of keys as printed on keyboards, where a language names them differently.
KEY_NAMES: dict[str, dict[str, str]] = {
    "fr": {"Enter": "Entrée", "Shift": "Maj", "Esc": "Échap"},
}

# Languages a reply can be asked in: code -> (name in English for the model, name shown).
REPLY_LANGUAGES: dict[str, tuple[str, str]] = {
    "en": ("English", "English"),
    "fr": ("French", "Français"),
    "es": ("Spanish", "Español"),
    "de": ("German", "Deutsch"),
    "it": ("Italian", "Italiano"),
    "pt": ("Portuguese", "Português"),
    "nl": ("Dutch", "Nederlands"),
    "zh": ("Chinese", "中文"),
    "ja": ("Japanese", "日本語"),
    "ko": ("Korean", "한국어"),
    "ar": ("Arabic", "العربية"),
    "ru": ("Russian", "Русский"),
    "hi": ("Hindi", "हिन्दी"),
}


def language_from_locale(value: str) -> str | None:
    """``fr_FR.UTF-8`` → ``fr``; ``C``/``POSIX``/unknown → None."""
    code = value.split(".", 1)[0].split("@", 1)[0].replace("-", "_").split("_", 1)[0].lower()
    return code if code in TABLES else None


def detect_language(environ: Mapping[str, str]) -> str:
    """The interface language from LC_ALL, LC_MESSAGES, LANG (the first one set in
    ``environ``)."""
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = environ.get(variable, "").strip()
        if value:
            return language_from_locale(value) or DEFAULT_LANGUAGE
    return DEFAULT_LANGUAGE


def unsupported_language(lang: str | None) -> bool:
    """True when ``lang`` asks for a language the interface does not have (``de``)."""
    return bool(lang) and language_from_locale(lang or "") is None


def resolve_language(lang: str | None, environ: Mapping[str, str]) -> str:
    """An explicit ``lang`` (``fr``, ``fr_FR``…) wins over the locale; unknown falls back to English."""
    if lang:
        return language_from_locale(lang) or DEFAULT_LANGUAGE
    return detect_language(environ)


class Strings:
    """Look up interface strings: ``strings("notify.exported", path=p)``."""

    def __init__(self, language: str = DEFAULT_LANGUAGE) -> None:
        self.language = language if language in TABLES else DEFAULT_LANGUAGE
        self._table = TABLES[self.language]

    def key_name(self, keys: str) -> str:
        """``Shift+Enter`` → ``Maj+Entrée`` in French; unchanged where names are the same."""
        names = KEY_NAMES.get(self.language, {})
        return re.sub(r"[A-Za-z]+", lambda m: names.get(m.group(0), m.group(0)), keys)

    def number(self, value: float, decimals: int = 0) -> str:
        """8192 -> '8,192' (English) or '8 192' (French); decimals with '.' or ','."""
        return format_number(value, decimals, self.language)

    def bytes(self, n: float) -> str:
        """1.25e9 -> '1.25 GB' or '1,25 Go'."""
        return format_bytes(n, self.language)

    def duration(self, seconds: float) -> str:
        """'45 s', '2 min 05 s', '1 h 03 min' (the same in both languages)."""
        seconds = max(0, round(seconds))
        if seconds < 60:
            return f"{seconds} s"
        if seconds < 3600:
            return f"{seconds // 60} min {seconds % 60:02d} s"
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"

    def has(self, key: str) -> bool:
        return key in ENGLISH

    def __call__(self, key: str, **values: object) -> str:
        template = self._table.get(key) or ENGLISH.get(key) or key
        return template.format(**values) if values else template
