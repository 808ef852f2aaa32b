"""Sizes and numbers as people read and write them: the project's one size parser (with the
memory budget's words on top) and one formatter of bytes, counts and decimals (English or French
conventions). Imports nothing heavy.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
          "GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}  # fmt: skip
_BYTE_UNITS = {"en": ("B", "KB", "MB", "GB", "TB"), "fr": ("o", "Ko", "Mo", "Go", "To")}
_THOUSANDS = {"en": ",", "fr": "\u202f"}  # French: narrow no-break space
_DECIMAL = {"en": ".", "fr": ","}


def parse_size(text: str | int) -> int:
    """'12GB' -> 12_000_000_000, '800MB', '1.5GiB', '4096' (bytes). Decimal units are powers of
    1000, binary ones (KiB...) of 1024. Raises ValueError with a one-line message otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"a size must be positive, not {text}")
        return text
    s = str(text).strip().upper().replace(" ", "").replace(",", ".")
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([KMGT]I?B?|B)?", s)
    unit = (match.group(2) or "") if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 12GB, 800MB or 1.5GiB)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return value


BUDGET_WORDS = ("auto", "none")  # a memory budget's words besides a size


def parse_budget(text: str | int) -> int | str:
    """A --memory-budget value: a size (parse_size), 'auto' (a safe share of this machine's
    memory) or 'none' (load everything, even if it does not fit)."""
    if isinstance(text, str) and text.strip().lower() in BUDGET_WORDS:
        return text.strip().lower()
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(
            f"not a memory size: {text!r} (use e.g. 12GB, 800MB, auto or none)"
        ) from None


def _lang(lang: str | None) -> str:
    return "fr" if (lang or "en").lower().startswith("fr") else "en"


def format_number(value: float, decimals: int = 0, lang: str | None = "en") -> str:
    """12345.678 -> '12,345.68' (en) or '12 345,68' (fr, narrow no-break spaces)."""
    lang = _lang(lang)
    text = f"{value:,.{decimals}f}"
    return text.replace(",", "\0").replace(".", _DECIMAL[lang]).replace("\0", _THOUSANDS[lang])


def format_significant(value: float, digits: int = 2, lang: str | None = "en") -> str:
    """A rate or ratio with `digits` significant figures: 0.0523 -> '0.052', 153.2 -> '150'."""
    if value == 0 or value != value or value in (float("inf"), float("-inf")):
        return format_number(value, 0, lang) if value == value else "?"
    text = f"{value:.{digits}g}"
    if "e" in text:  # 1.5e+02 -> 150
        text = f"{float(text):f}".rstrip("0").rstrip(".")
    if "." in text:
        whole, frac = text.split(".")
        return format_number(float(whole), 0, lang) + _DECIMAL[_lang(lang)] + frac
    return format_number(float(text), 0, lang)


def format_bytes(n: float, lang: str | None = "en") -> str:
    """Decimal units with three significant figures: 26.3 GB, 281 MB, 4.10 KB, 512 B
    (French: 26,3 Go)."""
    units = _BYTE_UNITS[_lang(lang)]
    for unit, scale in zip(units[:0:-1], (1e12, 1e9, 1e6, 1e3)):
        if abs(n) >= scale * 0.9995:
            value = n / scale
            decimals = 0 if abs(value) >= 99.95 else 1 if abs(value) >= 9.995 else 2
            return f"{format_number(value, decimals, lang)} {unit}"
    return f"{int(n)} {units[0]}"


def format_count(n: float) -> str:
    """46_700_000_000 -> '46.7B', 4_268_864 -> '4.27M' (parameters, tokens)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def size_arg(n: float) -> str:
    """A size as a command-line argument, rounded up to one decimal: 7.31e9 -> '7.4GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            value = -(-n * 10 // scale) / 10
            return f"{value:g}{unit}"
    return str(int(n))
