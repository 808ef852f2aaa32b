"""Streaming group-wise quantization into mlx-lm's format, resumable, never half-written.

One output module at a time: its source tensors are read lazily (`mx.load`), assembled (experts
stacked, Mistral Q/K permuted), quantized with `mx.quantize`, evaluated and streamed into the
output shard, then released. Peak memory is about one layer's experts of one projection, not
the model. Shards go to `DST.partial/`; `progress.json` there records each finished shard's size
and SHA-256 so a re-run resumes; the directory is renamed to DST only when everything is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.errors import MixchatError
from model.sizes import format_bytes, format_count

from .progress import byte_progress, stderr_console
from .sources import Source, Target

FORMAT_VERSION = 1
MAX_SHARD_BYTES = 5 * 10**9
MANIFEST = "progress.json"
INDEX = "model.safetensors.index.json"
ALLOWED_BITS = (2, 3, 4, 6, 8)
ALLOWED_GROUP_SIZES = (32, 64, 128)
ST_DTYPES = {"uint32": "U32", "uint8": "U8", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ITEM_SIZE = {"uint32": 4, "uint8": 1, "bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Settings:
    """What `mixchat quantize` was asked for; `None` bits fall back to `bits`, 16 = unquantized."""

    bits: int = 4
    group_size: int = 64
    router_bits: int = 16
    embed_bits: int | None = None  # embedding and output projection
    expert_bits: int | None = None
    dtype: str | None = None  # float16 | bfloat16 | float32; None: the source's
    max_shard_bytes: int = MAX_SHARD_BYTES

    def validate(self) -> None:
        for name in ("bits", "router_bits", "embed_bits", "expert_bits"):
            value = getattr(self, name)
            allowed = ALLOWED_BITS if name in ("bits", "expert_bits") else (*ALLOWED_BITS, 16)
            if value is not None and value not in allowed:
                raise MixchatError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}"
                )
        if self.group_size not in ALLOWED_GROUP_SIZES:
            raise MixchatError(
                f"--group-size must be one of {', '.join(map(str, ALLOWED_GROUP_SIZES))}"
            )
        if self.dtype not in (None, "float16", "bfloat16", "float32"):
            raise MixchatError("--dtype must be float16, bfloat16 or float32")

    def precision_for(self, target: Target) -> tuple[int, int] | None:
        """(bits, group size) for a module, or None to keep it unquantized (norms, 16-bit,
        indivisible rows). A family's module takes mlx-lm's choice (Target.choice): its gates
        at their own precision (a dict) or, like everything else, at --bits."""
        if isinstance(target.choice, dict):
            group = target.choice.get("group_size", self.group_size)
            bits = None if target.shape[-1] % group else target.choice.get("bits", self.bits)
            return (bits, group) if bits else None
        bits = {"attn": self.bits, "mlp": self.bits, "experts": self.expert_bits or self.bits,
                "router": self.bits if target.choice else self.router_bits,
                "embed": self.embed_bits or self.bits, "head": self.embed_bits or self.bits,
                }.get(target.kind)  # fmt: skip
        if target.choice is False or bits in (None, 16) or target.shape[-1] % self.group_size:
            return None
        return bits, self.group_size


@dataclass
class OutTensor:
    name: str
    dtype: str  # "uint32" | "bfloat16" | "float16" | "float32" (| "uint8": MXFP4 scales kept)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEM_SIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Item:
    target: Target
    bits: int | None
    tensors: list[OutTensor]
    group_size: int = 64

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Shard:
    name: str
    items: list[Item] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def source_bytes(self) -> int:
        return sum(i.target.source_bytes for i in self.items)


@dataclass
class Plan:
    shards: list[Shard]
    quantization: dict[str, Any]
    out_dtype: str

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def make_plan(source: Source, settings: Settings) -> Plan:
    """Every output tensor with its exact dtype and shape, grouped into shards <= max size."""
    settings.validate()
    out_dtype = settings.dtype or source.dtype
    gs = settings.group_size
    # An MXFP4 source's own quantization stays the default, every module quantized here named
    # with its own (mlx_lm.convert's fine-grained config of a partly quantized model)
    base = source.quantization
    quantization: dict[str, Any] = dict(base or {"group_size": gs, "bits": settings.bits, "mode": "affine"})  # fmt: skip
    items = []
    for target in source.targets:
        bits, group = settings.precision_for(target) or (None, gs)
        m, shape = target.module, target.shape
        if bits is None:
            tensors = [OutTensor(target.tensor, target.dtype or out_dtype, shape)]
            if target.kind not in ("norm", "param"):
                quantization[m] = False
        else:
            packed = (*shape[:-1], shape[-1] * bits // 32)
            groups = (*shape[:-1], shape[-1] // group)
            tensors = [
                OutTensor(f"{m}.weight", "uint32", packed),
                OutTensor(f"{m}.scales", out_dtype, groups),
                OutTensor(f"{m}.biases", out_dtype, groups),
            ]
            if (bits, group) != (settings.bits, gs) or base:
                quantization[m] = {"group_size": group, "bits": bits, "mode": "affine"}
        items.append(Item(target, bits, tensors, group))
    # Read the sources roughly in file order; keep each module's tensors in one shard.
    order = {path: i for i, path in enumerate(source.shards)}
    items.sort(key=lambda it: max(order[r.file] for r in it.target.refs))
    groups: list[list[Item]] = []
    size = 0
    for item in items:
        if not groups or size + item.nbytes > settings.max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]  # fmt: skip
    return Plan(
        [Shard(name, g) for name, g in zip(names, groups, strict=True)], quantization, out_dtype
    )


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Streams tensors into a safetensors file whose header (names, dtypes, shapes) is known first.

    Same layout as `mx.save_safetensors` (8-byte header length, JSON header padded to 8 bytes,
    raw little-endian data, metadata {"format": "mlx"}), but tensor by tensor, hashing as it goes.
    """

    def __init__(self, path: Path, tensors: list[OutTensor]):
        header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for t in tensors:
            header[t.name] = {
                "dtype": ST_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self.pending = list(tensors)
        self.sha = hashlib.sha256()
        self.size = 0
        self.file = open(path, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data: Any) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += memoryview(data).nbytes

    def write(self, name: str, array: Any) -> None:
        import mlx.core as mx

        expected = self.pending.pop(0)
        if (
            expected.name != name
            or tuple(array.shape) != expected.shape
            or str(array.dtype) != f"mlx.core.{expected.dtype}"
        ):
            raise RuntimeError(
                f"internal error: wrote {name} {array.dtype}{list(array.shape)}, planned {expected}"
            )
        self._write(memoryview(mx.contiguous(array).view(mx.uint8)))

    def close(self) -> tuple[int, str]:
        """Flush to disk; returns (size in bytes, sha256 hex)."""
        if self.pending:
            raise RuntimeError(
                f"internal error: {len(self.pending)} tensors not written to {self.path.name}"
            )
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.size, self.sha.hexdigest()

    def abort(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def quantize_item(item: Item, group_size: int, out_dtype: str) -> list[Any]:
    """One module's output arrays (in `item.tensors` order), already being computed."""
    import mlx.core as mx

    w = item.target.load()
    dtype = getattr(mx, out_dtype)
    if item.bits is None:
        arrays = [w if item.target.dtype else w.astype(dtype)]
    else:
        # Quantize in the output dtype, as mlx_lm.convert does (scales/biases come out in it).
        arrays = list(mx.quantize(w.astype(dtype), item.group_size or group_size, item.bits))
    mx.async_eval(arrays)
    return arrays


def write_shard(
    path: Path, shard: Shard, group_size: int, out_dtype: str, advance: Any = None
) -> tuple[int, str]:
    """Quantize and write one output shard; `advance(nbytes)` reports source bytes consumed.

    Pipelined: MLX computes module i+1 while module i is written and hashed.
    """
    import mlx.core as mx

    tmp = path.with_name(path.name + ".tmp")
    writer = ShardWriter(tmp, [t for item in shard.items for t in item.tensors])
    try:
        pending: tuple[Item, list[Any]] | None = None
        for item in [*shard.items, None]:
            following = (item, quantize_item(item, group_size, out_dtype)) if item else None
            if pending:
                done, arrays = pending
                for t, a in zip(done.tensors, arrays, strict=True):
                    writer.write(t.name, a)
                pending = arrays = None  # type: ignore[assignment]
                mx.clear_cache()
                if advance:
                    advance(done.target.source_bytes)
            pending = following
        size, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    os.replace(tmp, path)
    return size, sha


# ----------------------------------------------------------------------------- resume


def _fingerprint(source: Source, settings: Settings, plan: Plan) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "source": str(source.path.resolve()),
        "source_files": [[p.name, p.stat().st_size] for p in source.shards],
        "settings": asdict(settings),
        "out_dtype": plan.out_dtype,
        "shards": [s.name for s in plan.shards],
    }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _resume_state(partial: Path, fingerprint: dict[str, Any], say: Any) -> dict[str, Any] | None:
    """Shards already finished in `partial` (verified by size and hash); None: start over."""
    if not partial.exists():
        return {}
    try:
        manifest = json.loads((partial / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        if any(partial.iterdir()):
            raise MixchatError(
                f"{partial} exists but is not an interrupted mixchat conversion; remove it"
            )
        return {}
    if manifest.get("fingerprint") != fingerprint:
        say(f"{partial.name} holds a conversion with other settings or source; starting over")
        return None
    done = {}
    for name, info in manifest.get("done", {}).items():
        p = partial / name
        if (
            p.is_file()
            and p.stat().st_size == info.get("size")
            and file_sha256(p) == info.get("sha256")
        ):
            done[name] = info
        else:
            say(f"{name} in {partial.name} is damaged; writing it again")
    return done


def _free_space(path: Path) -> int:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


# ----------------------------------------------------------------------------- convert


@dataclass
class Result:
    dst: Path
    bytes_written: int
    total_bytes: int
    bits_per_weight: float
    seconds: float
    shards_written: list[str]
    shards_reused: list[str]


def convert(
    source: Source, dst: str | Path, settings: Settings, *, force: bool = False, quiet: bool = False
) -> Result:
    """Quantize `source` into `dst` (see module docstring). Raises MixchatError for user errors."""
    dst = Path(dst).expanduser().absolute()
    partial = dst.with_name(dst.name + ".partial")
    console = stderr_console()

    def say(msg: str) -> None:
        if not quiet:
            console.print(msg, markup=False)

    src_abs, dst_abs = source.path.resolve(), dst.resolve()
    if dst_abs == src_abs or src_abs in dst_abs.parents:
        raise MixchatError(f"DST {dst} must not be the source directory or inside it")
    if dst.exists() and not force:
        raise MixchatError(f"{dst} already exists (pass --force to replace it)")
    if dst.exists() and not dst.is_dir():
        raise MixchatError(f"{dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()) and not (dst / "config.json").exists():
        raise MixchatError(f"{dst} is not a model directory; not replacing it even with --force")
    plan = make_plan(source, settings)
    fingerprint = _fingerprint(source, settings, plan)
    done = _resume_state(partial, fingerprint, say)
    restart = done is None
    done = done or {}
    todo = [s for s in plan.shards if s.name not in done]
    need = (
        sum(s.nbytes for s in todo)
        + sum(p.stat().st_size for p in source.extra_files.values())
        + (64 << 20)
    )
    free = _free_space(partial)
    if free < need:
        raise MixchatError(
            f"not enough disk space for {dst}: needs {format_bytes(need)}, {format_bytes(free)} free"
        )

    for line in describe(source, settings, plan):
        say(line)
    if restart:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    manifest = {"fingerprint": fingerprint, "done": done}
    _write_json(partial / MANIFEST, manifest)
    for stray in list(partial.iterdir()):  # half-written shards of an interrupted run
        if stray.name not in done and stray.name != MANIFEST:
            stray.unlink() if stray.is_file() else shutil.rmtree(stray)
    if done:
        say(f"Resuming: {len(done)} of {len(plan.shards)} shards already written")

    start = time.perf_counter()
    progress = byte_progress(quiet)
    total_src = sum(s.source_bytes for s in todo)
    if progress:
        progress.start()
        task = progress.add_task("Quantizing", total=total_src)

        def advance(n: int) -> None:
            progress.advance(task, n)

    else:
        advance = None  # type: ignore[assignment]
    try:
        for shard in todo:
            size, sha = write_shard(
                partial / shard.name, shard, settings.group_size, plan.out_dtype, advance
            )
            manifest["done"][shard.name] = {"size": size, "sha256": sha}
            _write_json(partial / MANIFEST, manifest)
    finally:
        if progress:
            progress.stop()

    weight_map = {t.name: s.name for s in plan.shards for i in s.items for t in i.tensors}
    index = {"metadata": {"total_size": plan.nbytes, "total_parameters": source.num_params},
             "weight_map": dict(sorted(weight_map.items()))}  # fmt: skip
    _write_json(partial / INDEX, index)
    config = dict(source.config)
    config.pop("quantization_config", None)
    config["quantization"] = plan.quantization
    config["quantization_config"] = plan.quantization
    (partial / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4) + "\n")
    for name, path in source.extra_files.items():
        shutil.copyfile(path, partial / name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(partial, dst)
    (dst / MANIFEST).unlink()
    return Result(
        dst=dst,
        bytes_written=sum(s.nbytes for s in todo),
        total_bytes=plan.nbytes,
        bits_per_weight=plan.nbytes * 8 / source.num_params,
        seconds=time.perf_counter() - start,
        shards_written=[s.name for s in todo],
        shards_reused=sorted(done),
    )


def describe(source: Source, settings: Settings, plan: Plan) -> list[str]:
    """Two lines for the user: what is read and what will be written."""
    kind = "Mistral format" if source.format == "mistral" else "Hugging Face"
    n = len(source.shards)
    src = (
        f"Source: {source.path} ({kind}, {source.model_type}, {format_count(source.num_params)} "
        f"params, {source.dtype}, {format_bytes(source.total_bytes)} in {n} shard{'s' * (n > 1)})"
    )

    def bits(b: int | None) -> str:
        return "unquantized" if b == 16 else f"{b}-bit"

    parts = [f"{settings.bits}-bit (group {settings.group_size})"]
    if settings.expert_bits and settings.expert_bits != settings.bits:
        parts.append(f"experts {bits(settings.expert_bits)}")
    if source.quantization:  # gpt-oss's MXFP4 experts, kept
        parts.append(f"experts {source.quantization['mode'].upper()} as published")
    if routers := [t for t in source.targets if t.kind == "router"]:  # a family's: mlx-lm's
        parts.append(f"router {bits((settings.precision_for(routers[0]) or (16,))[0])}")
    if settings.embed_bits and settings.embed_bits != settings.bits:
        parts.append(f"embeddings {bits(settings.embed_bits)}")
    n = len(plan.shards)
    out = (
        f"Output: {', '.join(parts)}, {plan.out_dtype} scales; "
        f"{format_bytes(plan.nbytes)} in {n} shard{'s' * (n > 1)}"
    )
    return [src, out]


__all__ = ["Settings", "Plan", "Result", "convert", "make_plan", "describe"]
