"""mixchat's settings, read once where the process starts (app/cli.py's `main`) from the command
line and the environment, then passed down as arguments: nothing below reads os.environ.

    setting         command line       environment
    model           --model            -
    dtype           --dtype            MIXCHAT_DTYPE
    memory budget   --memory-budget    MIXCHAT_MEMORY_BUDGET
    context         --max-context      -
    KV cache bits   --kv-bits          -
    language        --lang             LC_ALL, LC_MESSAGES, LANG (the first one set)
    data directory  -                  MIXCHAT_HOME (else the platform's user data directory)
    CPU streams     -                  MIXCHAT_STREAMS (matrix products split across; a tuning knob)
    expert offload  -                  MIXCHAT_OFFLOAD_POLICY, MIXCHAT_OFFLOAD_PREFETCH,
                                       MIXCHAT_OFFLOAD_PAGE_CACHE (tuning knobs)
    ranks' split    -                  MIXCHAT_PARALLEL ("expert" or "pipeline")
    debug           -                  MIXCHAT_DEBUG (internal errors keep their traceback)
    server          -                  MIXCHAT_SERVER (`ask` uses a running `mixchat serve`;
                                       default http://127.0.0.1:8741, "off": never)
    API key         --api-key (serve)  MIXCHAT_API_KEY (the server's key; `ask` sends it)
    offline         -                  HF_HUB_OFFLINE (`download` uses the local cache only)

The command line wins over the environment. Only MLX's own launch variables (MLX_*) are read
elsewhere (model/ranks.py). Imports nothing heavy (no MLX).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.i18n import TABLES, language_from_locale, resolve_language
from model import registry
from model.errors import MixchatError
from model.load_options import LoadOptions

if TYPE_CHECKING:
    from model.offload import OffloadOptions

DTYPES = ("float32", "float16", "bfloat16")
LANGUAGES = tuple(TABLES)  # the interface languages


class SettingsError(MixchatError):
    """A setting with a value mixchat cannot use (exits 2, like a usage error)."""


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # a path, a cached repo id, or None: the embedded default model
    dtype: str | None = None  # one of DTYPES, or None: float32 on a CPU, half on a GPU
    memory_budget: int | str | None = None  # bytes, "auto", or None: no budget
    lang: str = "en"  # one of LANGUAGES
    data_dir: Path = field(default_factory=lambda: data_dir())  # chats and known models
    streams: int | None = None  # None: one per core (at most 2) on a CPU
    debug: bool = False
    server: str | None = "http://127.0.0.1:8741"  # where `ask` looks for `mixchat serve`, or None
    api_key: str | None = None
    max_context: int | None = None  # tokens the KV cache is planned for; None: what fits
    kv_bits: int | None = None  # 8 or 4: a quantized KV cache
    offload: OffloadOptions | None = None  # MIXCHAT_OFFLOAD_*; None: the runtime's defaults
    parallel: str = "expert"  # how several ranks split a model (checked when they join)
    hf_offline: bool = False  # HF_HUB_OFFLINE: `download` never reaches the Hub
    adapter_path: str | None = None  # --adapter-path: a LoRA adapter applied to the model
    # The MIXCHAT_* variables, which `--hosts` passes on to the ranks it starts.
    rank_variables: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def load_options(self) -> LoadOptions:
        """How `model.load` / `Engine.load` load the model."""
        return LoadOptions(dtype=self.dtype, memory_budget=self.memory_budget,
                           max_context=self.max_context, kv_bits=self.kv_bits,
                           streams=self.streams, offload=self.offload,
                           adapter_path=self.adapter_path)  # fmt: skip


def read_settings(args: Any = None, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from parsed arguments (any of model, dtype, memory_budget, max_context,
    kv_bits, lang; absent or None: not given) and the environment. Raises SettingsError for an
    unusable value."""
    environ = os.environ if environ is None else environ
    home = data_dir(environ)
    return Settings(
        model=_model(getattr(args, "model", None) or None, home),
        dtype=_dtype(getattr(args, "dtype", None), environ),
        memory_budget=_budget(getattr(args, "memory_budget", None), environ),
        lang=_language(getattr(args, "lang", None), environ),
        data_dir=home,
        streams=_streams(environ),
        debug=environ.get("MIXCHAT_DEBUG", "").strip() not in ("", "0"),
        server=_server(environ),
        api_key=environ.get("MIXCHAT_API_KEY", "").strip() or None,
        max_context=getattr(args, "max_context", None),
        kv_bits=getattr(args, "kv_bits", None),
        offload=_offload(environ),
        parallel=(environ.get("MIXCHAT_PARALLEL") or Settings.parallel).strip().lower(),
        hf_offline=environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"),
        # `tune --adapter-path` is where its output goes, not an adapter to load
        adapter_path=None if getattr(args, "command", None) == "tune"
        else getattr(args, "adapter_path", None) or None,
        rank_variables={k: v for k, v in environ.items() if k.startswith("MIXCHAT_")},
    )


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """mixchat's one data directory (chats, known models, measurements): MIXCHAT_HOME, else the
    platform's user data directory. `environ`: None reads this process's environment."""
    environ = os.environ if environ is None else environ
    if home := environ.get("MIXCHAT_HOME", "").strip():
        return Path(home).expanduser()
    return registry.default_data_dir()


OFFLOAD_VARIABLES = ("MIXCHAT_OFFLOAD_POLICY", "MIXCHAT_OFFLOAD_PREFETCH",
                     "MIXCHAT_OFFLOAD_PAGE_CACHE")  # fmt: skip


def _offload(environ: Mapping[str, str]) -> OffloadOptions | None:
    """MIXCHAT_OFFLOAD_POLICY (auto, lru, lfu, lru-layer, lfu-layer, next-use),
    MIXCHAT_OFFLOAD_PREFETCH (0/1), MIXCHAT_OFFLOAD_PAGE_CACHE (1: let the OS cache expert
    reads); None when none is set (the runtime's defaults)."""
    if not any(environ.get(name) for name in OFFLOAD_VARIABLES):
        return None
    from model.offload import OffloadOptions

    options = OffloadOptions()
    if policy := environ.get("MIXCHAT_OFFLOAD_POLICY"):
        options.policy = policy.strip().lower()
    if prefetch := environ.get("MIXCHAT_OFFLOAD_PREFETCH"):
        options.prefetch = prefetch.strip() not in ("0", "", "no", "off")
    if page_cache := environ.get("MIXCHAT_OFFLOAD_PAGE_CACHE"):
        options.bypass_page_cache = page_cache.strip() in ("0", "no")
    return options


def _model(given: str | None, home: Path) -> str | None:
    """The model as given, or the path of the quantized directory `mixchat models` lists under
    that name (so every listed name works as --model everywhere, the server included)."""
    if given and not Path(given).expanduser().exists():
        if known := registry.known_by_name(given, home):
            return str(known)
    return given


def _server(environ: Mapping[str, str]) -> str | None:
    value = environ.get("MIXCHAT_SERVER", Settings.server or "").strip()
    return None if value.lower() in ("", "off", "none", "0") else value


def _dtype(given: str | None, environ: Mapping[str, str]) -> str | None:
    value = given or environ.get("MIXCHAT_DTYPE", "").strip() or None
    if value is not None and value not in DTYPES:
        raise SettingsError(f"MIXCHAT_DTYPE must be one of {', '.join(DTYPES)}, not '{value}'")
    return value


def _budget(given: int | str | None, environ: Mapping[str, str]) -> int | str | None:
    if given is not None:
        return given
    value = environ.get("MIXCHAT_MEMORY_BUDGET", "").strip()
    if not value:
        return None
    from model.memory_plan import parse_budget

    try:
        return parse_budget(value)
    except ValueError as e:
        raise SettingsError(f"MIXCHAT_MEMORY_BUDGET: {e}") from None


def _language(given: str | None, environ: Mapping[str, str]) -> str:
    if given and language_from_locale(given) is None:
        raise SettingsError(
            f"no interface in '{given}': choose one of {', '.join(LANGUAGES)} (--lang)"
        )
    return resolve_language(given, environ)


def _streams(environ: Mapping[str, str]) -> int | None:
    value = environ.get("MIXCHAT_STREAMS", "").strip()
    if not value:
        return None
    try:
        streams = int(value)
    except ValueError:
        streams = 0
    if streams < 1:
        raise SettingsError(f"MIXCHAT_STREAMS must be a whole number of at least 1, not '{value}'")
    return streams
