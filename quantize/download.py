"""`mixchat download`: fetch only what inference needs from the Hugging Face Hub, resumably.

Files land in the standard Hugging Face cache (so `mixchat quantize REPO_ID` and mlx-lm find
them); interrupted files resume from the cache's `.incomplete` blobs. The total size is shown and
the free disk space checked before the first byte. With HF_HUB_OFFLINE=1 nothing is fetched:
the repo is resolved from the local cache.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from typing import Any

from model.errors import CheckpointError, MixchatError
from model.names import HF_TOKENIZER_FILES, MISTRAL_TOKENIZER_FILES
from model.safetensors_header import PICKLE_SUFFIXES
from model.sizes import format_bytes

from .progress import byte_progress, stderr_console

TOKENIZER_FILES = (*HF_TOKENIZER_FILES, *MISTRAL_TOKENIZER_FILES)
HF_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
MISTRAL_FILES = ("params.json", "consolidated.safetensors.index.json")


def _offline() -> bool:
    """huggingface_hub's own HF_HUB_OFFLINE (as it read it when imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def select_files(files: list[str]) -> list[str]:
    """The files inference needs: config, safetensors weights (one format only), tokenizer.

    Repos shipping both layouts (Mistral's, often) get the Hugging Face one. Sub-folders
    (e.g. `original/`), pickles (.bin/.pth), GGUF and ONNX exports are never selected.
    """
    top = [f for f in files if "/" not in f]
    safetensors = [f for f in top if f.endswith(".safetensors")]
    hf_weights = [f for f in safetensors if not f.startswith("consolidated")]
    mistral_weights = [f for f in safetensors if f.startswith("consolidated")]

    def matching(patterns: tuple[str, ...]) -> list[str]:
        return [f for f in top if any(fnmatch.fnmatchcase(f, p) for p in patterns)]

    if "config.json" in top and hf_weights:
        chosen = matching(HF_FILES) + hf_weights
    elif "params.json" in top and mistral_weights:
        chosen = matching(MISTRAL_FILES) + mistral_weights
    elif any(f.endswith(PICKLE_SUFFIXES) for f in files):
        raise CheckpointError(
            "this repo has only PyTorch pickle weights (.bin/.pth); mixchat reads safetensors only"
        )
    elif not safetensors:
        raise CheckpointError("this repo has no safetensors weights")
    else:
        raise CheckpointError("this repo has safetensors but no config.json or params.json")
    return sorted(set(chosen + matching(TOKENIZER_FILES)))


def _free_space(path: Path) -> int:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _progress_class(progress: Any, task: Any) -> type:
    """A tqdm stand-in for `hf_hub_download(tqdm_class=...)` that feeds one shared rich bar.

    Mirrors the aggregating bar huggingface_hub's own snapshot_download passes in.
    """

    class Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any):
            self.total = total
            self.n = initial
            self.format_dict: dict[str, Any] = {}
            if progress is not None and initial:
                progress.advance(task, initial)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            if progress is not None:
                progress.advance(task, int(n or 0))

        def update_transfer(self, n: float | None = 1) -> None:  # network bytes; disk bytes count
            return None

        def __getattr__(self, name: str) -> Any:  # set_postfix_str, refresh, close, ...
            return lambda *args, **kwargs: None

    return Bar


def check_repo_id(repo_id: str) -> None:
    """Refuse, in one line, what is not a Hub repo id (a local path, most often)."""
    from model.registry import REPO_ID

    if Path(repo_id).expanduser().exists():
        raise MixchatError(
            f"'{repo_id}' is a local path, not a Hugging Face repo id: nothing to download "
            f"(use it as it is: `mixchat ask --model {repo_id}`)"
        )
    if not REPO_ID.match(repo_id):
        raise MixchatError(
            f"'{repo_id}' is not a Hugging Face repo id (owner/name, e.g. "
            "mistralai/Mixtral-8x7B-Instruct-v0.1)"
        )


def _hub_error(repo_id: str, e: Exception, filename: str | None = None) -> MixchatError:
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return MixchatError(
            f"{repo_id} is gated: accept its conditions on huggingface.co, then log in with `hf auth login`"
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        return MixchatError(
            f"{repo_id}: no such repository on the Hugging Face Hub (or it is private: `hf auth login`)"
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return MixchatError(f"{repo_id}: no such revision")
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if filename:
        return MixchatError(
            f"downloading {filename} failed ({first}); run the same command again to resume"
        )
    return MixchatError(
        f"cannot reach the Hugging Face Hub ({first}); set HF_HUB_OFFLINE=1 to use the local cache"
    )


def download(
    repo_id: str,
    revision: str | None = None,
    *,
    quiet: bool = False,
    cache_dir: str | Path | None = None,
    offline: bool = False,
) -> Path:
    """Download (or, offline, find in the cache) what inference needs; returns the snapshot dir.
    `offline` (HF_HUB_OFFLINE, read by app/settings.py): only the local cache is used."""
    from huggingface_hub import (
        HfApi,
        constants,
        hf_hub_download,
        snapshot_download,
        try_to_load_from_cache,
    )

    console = stderr_console()

    def say(msg: str) -> None:
        if not quiet:
            console.print(msg, markup=False)

    check_repo_id(repo_id)
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    if offline or _offline():
        try:
            path = Path(
                snapshot_download(
                    repo_id, revision=revision, cache_dir=cache, local_files_only=True
                )
            )
        except Exception:  # its message advises passing local_files_only=False: not ours to give
            raise MixchatError(
                f"{repo_id}{f' ({revision})' if revision else ''} is not in the local Hugging Face "
                "cache, and HF_HUB_OFFLINE=1 forbids downloading it (unset HF_HUB_OFFLINE to "
                "download)"
            ) from None
        say(f"HF_HUB_OFFLINE=1: using the cached copy of {repo_id}")
        return path

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        raise _hub_error(repo_id, e) from None
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    try:
        files = select_files(list(sizes))
    except CheckpointError as e:
        raise CheckpointError(f"{repo_id}: {e}") from None
    commit = info.sha or revision
    cached: dict[str, str] = {}
    for f in files:
        hit = try_to_load_from_cache(repo_id, f, cache_dir=cache, revision=commit)
        if isinstance(hit, str):
            cached[f] = hit
    total = sum(sizes[f] for f in files)
    missing = sum(sizes[f] for f in files if f not in cached)
    say(
        f"{repo_id} ({(commit or '')[:8]}): {len(files)} files, {format_bytes(total)}"
        + (f", {format_bytes(missing)} to download" if cached else "")
    )
    free = _free_space(cache)
    if missing and free < missing + (256 << 20):
        raise MixchatError(
            f"not enough disk space in {cache}: the download needs {format_bytes(missing)}, "
            f"{format_bytes(free)} free (set HF_HOME to download elsewhere)"
        )

    progress = byte_progress(quiet)
    task = progress.add_task("Downloading", total=missing) if progress else None
    bar = _progress_class(progress, task)

    def fetch(name: str) -> str:
        try:
            return hf_hub_download(repo_id, name, revision=commit, cache_dir=cache, tqdm_class=bar)
        except Exception as e:
            raise _hub_error(repo_id, e, name) from None

    # One file at a time in this thread, so Ctrl-C stops at once (hf_xet parallelizes within files).
    if progress:
        progress.start()
    try:
        paths = [cached[f] if f in cached else fetch(f) for f in files]
    finally:
        if progress:
            progress.stop()
    snapshot = Path(paths[0]).parent
    say(f"{'Downloaded' if missing else 'Already downloaded:'} {repo_id} in {snapshot}")
    return snapshot
