"""Copying text to the system clipboard with a tool that says whether it worked.

The app also sends OSC 52 (``App.copy_to_clipboard``), but a terminal or tmux may drop it
silently (tmux's default ``set-clipboard external``); only a tool's exit status is proof. Each
tool on PATH is tried in turn: one without its display (wl-copy outside Wayland, xclip without
X11) fails, and the next is tried.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping

TOOLS: tuple[tuple[str, ...], ...] = (
    ("pbcopy",),
    ("wl-copy",),
    ("xclip", "-selection", "clipboard"),
)


def copy_text(text: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Copy ``text`` with the first clipboard tool that succeeds; returns its name, or None when
    no tool is there or none succeeded. ``environ``: the tools' environment (None: this
    process's, as it was given)."""
    search_path = None if environ is None else environ.get("PATH", "")
    for program, *arguments in TOOLS:
        path = shutil.which(program, path=search_path)
        if path is None:
            continue
        try:
            done = subprocess.run(
                [path, *arguments],
                input=text.encode("utf-8"),
                stdout=subprocess.DEVNULL,  # xclip stays behind to serve the selection: no pipes
                stderr=subprocess.DEVNULL,
                timeout=5,
                env=None if environ is None else dict(environ),
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return program
    return None
