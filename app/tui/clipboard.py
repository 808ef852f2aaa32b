"""Copying text to the system clipboard with a tool that says whether it worked.

The app also sends OSC 52 (``App.copy_to_clipboard``), but a terminal or tmux may drop it
silently (tmux's default ``set-clipboard external``); only a tool's exit status is proof.
"""

from __future__ import annotations

import os
import shutil
import subprocess

# (program, arguments), tried in order; Wayland's and X11's only where their display is set.
TOOLS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("pbcopy", (), None),
    ("wl-copy", (), "WAYLAND_DISPLAY"),
    ("xclip", ("-selection", "clipboard"), "DISPLAY"),
)


def copy_text(text: str, environ: dict[str, str] | None = None) -> str | None:
    """Copy ``text`` with the first clipboard tool on PATH that succeeds; returns its name, or
    None when no tool is there or none succeeded."""
    environ = dict(os.environ) if environ is None else environ
    for program, arguments, display in TOOLS:
        if display is not None and not environ.get(display):
            continue
        path = shutil.which(program, path=environ.get("PATH"))
        if path is None:
            continue
        try:
            done = subprocess.run(
                [path, *arguments],
                input=text.encode("utf-8"),
                stdout=subprocess.DEVNULL,  # xclip stays behind to serve the selection: no pipes
                stderr=subprocess.DEVNULL,
                timeout=5,
                env=environ,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return program
    return None
