"""Which model is loaded: load on request (one at a time, within the memory budget), unload
after `keep_alive` seconds idle, and keep each conversation's KV cache in a small LRU so a chat
client's next turn prefills only its new tokens.

Everything but resolve() runs in the scheduler's worker thread (one MLX user at a time).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache

from model import registry, weights
from model.errors import MixchatError
from model.generate import Engine
from model.load_options import LoadOptions

from .requests import ApiError


def display_name(spec: str | None, path: Path) -> str:
    """The name clients see: the one Engine.load gives the model."""
    if spec in (None, "", "default", registry.DEFAULT_MODEL):
        return registry.DEFAULT_MODEL
    if path.suffix == ".gguf":
        return path.stem
    return path.resolve().name if Path(spec).expanduser().exists() else spec


class ModelManager:
    def __init__(
        self,
        model: str | None = None,
        *,
        load_options: LoadOptions | None = None,
        keep_alive: float | None = 300.0,
        prompt_cache_bytes: int = 1 << 30,
        prompt_cache_slots: int = 8,
    ):
        self.load_options, self.keep_alive = load_options or LoadOptions(), keep_alive
        self.cache_bytes, self.cache_slots = prompt_cache_bytes, prompt_cache_slots
        self._names: dict[str, str] = {}  # model name or spec -> key
        self._name_of: dict[str, str] = {}  # key -> display name
        self._parts: dict[str, tuple[str, str]] = {}  # key with an adapter -> (model, adapter)
        self.adapter = self.load_options.adapter_path  # --adapter-path: the start model's
        self.start_key: str | None = None
        self.start_key = self.resolve(model)  # fails now, before serving, for a bad --model
        self.engine: Engine | None = None
        self.key: str | None = None
        self.last_used = time.monotonic()
        self.loads = 0  # how many times a model was loaded (shown by /health)
        self.replaced: str | None = None  # the model the last load unloaded, if any
        self.prompt_cache = LRUPromptCache(prompt_cache_slots, prompt_cache_bytes)

    def _remember(self, spec: str | None, key: str) -> None:
        name = display_name(spec, Path(key))
        self._name_of.setdefault(key, name)
        self._names[name] = key
        if spec:
            self._names[spec] = key

    def resolve(self, spec: str | None, adapter: str | None = None) -> str:
        """A request's `model` and `adapters` -> the key of that model with that adapter
        (None: the server's --adapter-path on the model it started with; "": none); ApiError
        404 for a model or adapter not there. Thread-safe; reads no weights."""
        base = self.parts(self.resolve_model(spec))[0]
        if adapter is None:
            adapter = self.adapter if base == self.start_key else None
        if not adapter:
            return base
        path = Path(adapter).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ApiError(404, f"no adapter at {adapter} (no adapter_config.json there)",
                           code="adapter_not_found", param="adapters")  # fmt: skip
        key = f"{base}\n{path.resolve()}"  # a newline: in no path a client names
        self._parts[key] = (base, str(path.resolve()))
        self._name_of.setdefault(key, self.name(base))
        return key

    def parts(self, key: str) -> tuple[str, str | None]:
        """A key -> (the model's key, its adapter or None)."""
        return self._parts.get(key, (key, None))

    def resolve_model(self, spec: str | None) -> str:
        """A request's `model` -> the key (resolved path) of a loadable checkpoint; ApiError 404
        for anything else. None, "" or "default": the model loaded now, else the one given at
        start (a client that names none never makes the server swap models). Thread-safe;
        reads no weights."""
        if spec in (None, "", "default") and self.start_key is not None:
            key = self.key  # the model loaded now (read without a lock: a str, or None)
            return key if key is not None else self.start_key
        if spec in self._names:
            return self._names[spec]
        try:
            path = registry.resolve(spec).resolve()
            weights.locate(path)
        except MixchatError as e:
            raise ApiError(404, f"model '{spec}': {e}", code="model_not_found",
                           param="model") from None  # fmt: skip
        key = str(path)
        self._remember(spec, key)
        return key

    def name(self, key: str, spec: str | None = None) -> str:
        """The model's name in answers: as Engine.load names `spec` (what the request asked
        for), or the name the model was first known by."""
        if spec not in (None, "", "default"):
            return display_name(spec, Path(self.parts(key)[0]))
        return self._name_of.get(key, Path(self.parts(key)[0]).name)

    def listed(self) -> list[str]:
        """Names for /v1/models: the model given at start, then the loaded one."""
        names = [self.name(self.start_key)]
        if self.key is not None and self.name(self.key) not in names:
            names.append(self.name(self.key))
        return names

    def engine_for(self, key: str) -> Engine:
        """The loaded engine for `key`, unloading another model first (MixchatError if the
        load fails); ``replaced`` is then that model's name (else None)."""
        self.last_used = time.monotonic()
        if self.key == key and self.engine is not None:
            return self.engine
        base, adapter = self.parts(key)
        if self.engine is not None and self.key is not None and self.parts(self.key)[0] == base:
            self.key = base  # the same model: only its adapter changes (the KV caches are
            self.engine.set_adapter(adapter)  # kept per key, adapter included)
            self.key = key
            return self.engine
        self.replaced = self.name(self.key) if self.engine is not None and self.key else None
        self.unload()
        print(f"mixchat serve: loading {self.name(key)}", file=sys.stderr)
        engine = Engine.load(base, self.load_options.but(adapter_path=adapter))
        if engine.memory_notice:
            print(f"mixchat serve: {engine.memory_notice}", file=sys.stderr)
        engine.name = self.name(key)
        self.engine, self.key, self.loads = engine, key, self.loads + 1
        self.last_used = time.monotonic()
        return engine

    def unload(self) -> None:
        """Free the model and its KV caches."""
        if self.engine is None:
            return
        print(f"mixchat serve: unloading {self.name(self.key or '')}", file=sys.stderr)
        self.engine = self.key = None
        self.prompt_cache = LRUPromptCache(self.cache_slots, self.cache_bytes)
        gc.collect()
        mx.clear_cache()

    def idle_deadline(self) -> float | None:
        """When the loaded model is to be unloaded (monotonic time), or None."""
        if self.engine is None or self.keep_alive is None:
            return None
        return self.last_used + self.keep_alive

    def take_cache(self, engine: Engine, ids: list[int]) -> None:
        """Start `engine` from the stored KV cache sharing the longest prefix with `ids`."""
        cache, rest = self.prompt_cache.fetch_nearest_cache(self.key, ids)
        engine.use_cache(cache, ids[: len(ids) - len(rest)] if cache is not None else [])

    def keep_cache(self, engine: Engine) -> None:
        """Store the engine's KV cache (its conversation so far) for a later request."""
        cache, tokens = engine.cache_state()
        if cache is not None and tokens:
            self.prompt_cache.insert_cache(self.key, tokens, cache)
        engine.use_cache(None, [])  # the LRU owns it now; take_cache hands out copies
        self.last_used = time.monotonic()

    def fetch_cache(self, ids: list[int]) -> tuple[list | None, list[int]]:
        """A copy of the stored KV cache sharing the longest prefix with `ids`, and the tokens
        of `ids` it lacks (a batched request's start)."""
        return self.prompt_cache.fetch_nearest_cache(self.key, ids)

    def keep_row_cache(self, tokens: list[int], cache: list) -> None:
        """Store a batched request's KV cache (its conversation so far) for a later request."""
        if tokens:
            self.prompt_cache.insert_cache(self.key, tokens, cache)
        self.last_used = time.monotonic()
