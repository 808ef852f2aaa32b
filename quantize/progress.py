"""Progress bars and durations shared by `mixchat download` and `mixchat quantize`."""

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
