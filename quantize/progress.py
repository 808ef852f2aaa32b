"""Progress bars and byte formatting shared by `mixchat download` and `mixchat quantize`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def fmt_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, like the Hub and Finder)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_count(n: float) -> str:
    """46_700_000_000 -> '46.7B', 4_268_864 -> '4.27M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '200KiB' -> 204_800, '1234' -> 1234."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * units[s[len(num) :]]
    except (ValueError, KeyError):
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value)


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def byte_progress(quiet: bool) -> Progress | None:
    """A bytes-done / rate / ETA bar on stderr; None when quiet or stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=False,
    )


@contextmanager
def step_progress(description: str, quiet: bool) -> Iterator[Callable[[str, int], None]]:
    """A steps-done bar on stderr; yields `advance(what, total)`, a no-op when quiet or when
    stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield lambda what, total: None
        return
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[what]}"),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=False,
    )
    task = progress.add_task(description, total=None, what="")

    def advance(what: str, total: int) -> None:
        progress.update(task, total=total, advance=1, what=what)

    with progress:
        yield advance
