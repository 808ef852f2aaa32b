"""`mixchat info`: describe a model without loading it (and whether it fits this machine)."""

from __future__ import annotations

import argparse
import json

from app.settings import DTYPES, Settings
from model.sizes import format_bytes, format_count

from .common import add_budget_option


class ModelArgument(argparse.Action):
    """MODEL given as the positional or as --model/-m (as every other command takes it)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values is None:  # the positional, absent
            return
        if getattr(namespace, self.dest, None) not in (None, values):
            raise argparse.ArgumentError(self, "give the model once: MODEL or --model")
        setattr(namespace, self.dest, values)


def register(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser(
        "info", help="describe a model without loading it",
        description="Describe MODEL without loading it: architecture, experts, parameters, "
        "quantization, size on disk and in memory, context; then whether it fits this machine "
        "under --memory-budget (the default: everything in memory when it fits, else the "
        "automatic budget; none: everything in memory, with a warning when it will not fit), the "
        "decode speed predicted from this machine's measurements, and options that would fit.",
    )  # fmt: skip
    info.add_argument("model", nargs="?", action=ModelArgument, metavar="MODEL",
                      help="model directory, .gguf file, cached repo id or a name `mixchat "
                      "models` lists (default: the embedded model); also --model/-m")  # fmt: skip
    info.add_argument("--model", "-m", action=ModelArgument, dest="model", metavar="MODEL",
                      help="the same as MODEL, as the other commands take it")  # fmt: skip
    info.add_argument("--json", action="store_true",
                      help="print one JSON object (the figures and the memory plan) instead")
    info.add_argument("--dtype", choices=DTYPES, help="compute dtype override")
    info.add_argument("--remeasure", action="store_true",
                      help="measure this machine's disk, memory and kernel speed again "
                      "(they are kept in the data directory)")  # fmt: skip
    info.add_argument("--hosts", metavar="HOSTFILE", help="memory per rank and speed over a "
                      "hostfile's machines (mlx.launch's or the ring backend's)")  # fmt: skip
    add_budget_option(info)
    info.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from model import registry, weights
    from model.info import model_info
    from model.machine import CACHE_FILE, MeasurementCache
    from model.predict import fit_report

    settings: Settings = args.settings
    path = registry.resolve(settings.model)  # a listed name is already its path (settings)
    checkpoint = weights.locate(path)
    name = registry.DEFAULT_MODEL if args.model is None else args.model
    dtype = weights.compute_dtype(checkpoint, settings.dtype)
    info = model_info(checkpoint, name, dtype.size)
    fit = fit_report(
        checkpoint, dtype, settings.memory_budget, args.model, settings.max_context, settings.kv_bits,
        MeasurementCache(settings.data_dir / CACHE_FILE), args.remeasure,
        weights.stream_count(settings.streams),
    )
    hosts = None
    if args.hosts:
        from model.distributed import hosts_report

        hosts = hosts_report(checkpoint, dtype.size, args.hosts, settings.data_dir)
    if args.json:
        extra = {"memory": fit.as_dict()} | ({"hosts": hosts[1]} if hosts else {})
        print(json.dumps(info.as_dict() | extra, ensure_ascii=False, indent=1))
        return 0
    experts = (
        f"{info.num_experts} per layer, {info.experts_per_token} used per token"
        if info.num_experts
        else "none (dense)"
    )
    rows = [
        ("model", info.name),
        ("path", info.path),
        ("architecture", f"{info.architecture}, {info.num_layers} layers, hidden {info.hidden_size}"),
        ("experts", experts),
        ("parameters", f"{format_count(info.total_params)} total, "
                       f"{format_count(info.active_params)} active per token"),
        ("quantization", info.quantization),
        *([("tensor types", info.tensor_types)] if info.tensor_types else []),
        ("size on disk", format_bytes(info.size_bytes)),
        ("memory to run", f"{format_bytes(info.memory_bytes)} weights + "
                          f"{format_bytes(info.kv_bytes_per_token * 1024)} KV cache per 1K tokens"),
        ("context", f"{info.context_length:,} tokens"
                    + (f", sliding window {info.sliding_window:,}" if info.sliding_window else "")),
    ]
    rows += fit.rows() + (hosts[0] if hosts else [])
    for key, value in rows:
        print(f"{key:<14} {value}")
    return 0
