"""Progress bars and durations shared by `mixchat download` and `mixchat quantize`."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


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
