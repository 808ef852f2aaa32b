"""The interface strings, English and French (en.py, fr.py), and the language they are chosen
in (strings.py): re-exports only."""

from .en import ENGLISH
from .fr import FRENCH
from .strings import (
    DEFAULT_LANGUAGE,
    KEY_NAMES,
    REPLY_LANGUAGES,
    TABLES,
    Strings,
    detect_language,
    language_from_locale,
    resolve_language,
    unsupported_language,
)

__all__ = [
    "DEFAULT_LANGUAGE", "ENGLISH", "FRENCH", "KEY_NAMES", "REPLY_LANGUAGES", "TABLES", "Strings",
    "detect_language", "language_from_locale", "resolve_language", "unsupported_language",
]  # fmt: skip
