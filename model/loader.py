"""The one way a model is loaded (`model.load` and `Engine.load` both come here): resolve the
path, describe the checkpoint, read its tokenizer, decide the memory plan, build the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .device_limits import limit_device
from .load_options import LoadOptions
from .memory_plan import BudgetError, parse_budget
from .registry import resolve
from .tokenizer import load_tokenizer
from .weights import Checkpoint, build_model, locate, plan_memory


@dataclass
class Loaded:
    model: Any  # model.mixtral.Model; model.memory: the memory_plan.MemoryDecision it loaded with
    tokenizer: Any  # model.tokenizer.Tokenizer
    checkpoint: Checkpoint
    path: Path  # where the checkpoint was found
    adapter_path: str | None = None  # the LoRA adapter applied, if any


def load_checkpoint(spec: str | Path | None, options: LoadOptions, *, lazy: bool = False,
                    split=None) -> Loaded:  # fmt: skip
    """Load `spec` (a HF or MLX-quantized directory, a GGUF file, a repo id already in the local
    Hugging Face cache, or None: the embedded default model; never downloads) as `options`
    say (with `options.adapter_path`: that LoRA adapter applied). `split` (model.distributed.RankSplit, from the app): this rank's part of a model
    split over several ranks; None loads it whole. `lazy`: weights are read when first used."""
    path = resolve(None if spec is None else str(spec))
    checkpoint = locate(path)
    tokenizer = load_tokenizer(
        checkpoint.gguf_metadata if checkpoint.format == "gguf" else checkpoint.path
    )
    budget = options.memory_budget
    if isinstance(budget, str):
        try:
            budget = parse_budget(budget)
        except ValueError as e:
            raise BudgetError(str(e)) from None
    memory = plan_memory(checkpoint, options.dtype, budget, options.max_context,
                         options.kv_bits, split=split)  # fmt: skip
    model = build_model(checkpoint, dtype=options.dtype, lazy=lazy, memory=memory,
                        streams=options.streams, split=split,
                        offload_options=options.offload)  # fmt: skip
    limit_device(model, memory, name=checkpoint.path.name)  # a Metal GPU: wired + cache limits
    if options.adapter_path:
        from .tune.lora import load_adapter

        load_adapter(model, options.adapter_path)
    return Loaded(model, tokenizer, checkpoint, path, options.adapter_path or None)


def load(path_or_repo_id: str | Path | None = None, options: LoadOptions | None = None, *,
         lazy: bool = False, split=None, **changes):  # fmt: skip
    """Load a model and its tokenizer (see `load_checkpoint`); returns (model, tokenizer).
    `changes`: LoadOptions fields given by name (`load(path, dtype="float16")`).

    A memory budget of None chooses (loads whole when it fits in what is available, else
    streams experts under the automatic budget: `model.memory.notice` says so)."""
    loaded = load_checkpoint(path_or_repo_id, (options or LoadOptions()).but(**changes),
                             lazy=lazy, split=split)  # fmt: skip
    return loaded.model, loaded.tokenizer
