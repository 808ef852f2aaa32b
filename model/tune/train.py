"""The LoRA training loop: mlx-lm's loss and optimizer (Adam), padded batches with masks,
validation, and saves from which `resume` continues the same run exactly.

Each step takes one batch: the training rows sorted by length and cut into batches of
`batch_size` (as mlx-lm's iterate_batches), their order shuffled per epoch by a generator
seeded with (seed, epoch); so the data position is a function of the step. A save writes
the adapter files (mlx-lm's) and one state file, atomically: the LoRA weights, Adam's state,
the step and what the run was started with (MLX's random generator, for dropout, is seeded from
(seed, step) before each step, so it needs no saving). Resuming reads it and goes on
as if the run had never stopped (bit for bit: the same batches, the same updates).

A budgeted run (experts streamed: model/tune/streamed.py's StreamedTrainer) replaces
`Trainer.step_grads` and `validate` only: the loss and its gradients for one batch, from a
forward pass that keeps each layer's input and a backward pass that goes through the layers
again in reverse; the optimizer, data and saves stay as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import MixchatError
from .data import Dataset, Row
from .lora import adapter_weights, save_adapter, write_atomic

STATE_FILE = "mixchat_train_state.safetensors"


@dataclass
class TrainConfig:
    """What a run is made of (mlx-lm's names and defaults where they exist)."""

    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    seed: int = 0
    steps_per_eval: int = 200
    save_every: int = 100
    val_batches: int = 25  # -1: the whole validation set

    def identity(self) -> dict:
        """What must not change between a run and its resumption (all but iters)."""
        return {k: v for k, v in asdict(self).items() if k != "iters"}


@dataclass
class Progress:
    """One report to the caller: after each step, each validation and each save."""

    step: int
    iters: int
    loss: float | None  # training loss of the last step
    val_loss: float | None  # the latest validation loss (None: no validation set)
    tokens_per_second: float
    eta_seconds: float | None
    peak_memory: int  # bytes
    event: str = "step"  # "step" | "eval" | "save"


def fingerprint(rows: list[Row]) -> str:
    """A digest of the encoded rows: resuming on other data is refused."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(np.array(row.ids + row.weights, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def batch_order(rows: list[Row], batch_size: int) -> list[list[int]]:
    """Row indices sorted by length, cut into whole batches (the remainder is left out)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    return [order[a : a + batch_size] for a in range(0, len(order) - batch_size + 1, batch_size)]


def epoch_batches(batches: list[list[int]], seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches, in an order that depends on (seed, epoch) only."""
    permutation = np.random.default_rng([seed, epoch]).permutation(len(batches))
    return [batches[i] for i in permutation]


def pad(rows: list[Row]) -> tuple[mx.array, mx.array, mx.array]:
    """Rows -> inputs [B, T], targets [B, T] and float mask [B, T] (0 on padding and on
    tokens not learned), T = the longest row's length - 1."""
    length = max(len(r.ids) for r in rows)
    ids = np.zeros((len(rows), length), dtype=np.int32)
    weights = np.zeros((len(rows), length), dtype=np.float32)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = row.ids
        weights[i, : len(row.weights)] = row.weights
    return mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(weights[:, 1:])


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array,
            mask: mx.array) -> tuple[mx.array, mx.array]:  # fmt: skip
    """mlx-lm's default_loss with a per-token mask: mean cross-entropy over learned tokens."""
    logits = model(inputs)  # model/blas.py's products carry their own backward (custom VJP)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


class Trainer:
    """Trains the LoRA parameters of `model` (apply_lora first) on `data`, saving into
    `adapter_path` (with `adapter_config` as adapter_config.json)."""

    def __init__(self, model: nn.Module, data: Dataset, config: TrainConfig, adapter_path: Path,
                 adapter_config: dict, report: Callable[[Progress], None] | None = None):  # fmt: skip
        self.model, self.data, self.config = model, data, config
        self.adapter_path, self.adapter_config = Path(adapter_path), adapter_config
        self.report = report or (lambda progress: None)
        self.batches = batch_order(data.train.rows, config.batch_size)
        if not self.batches:
            raise MixchatError(f"the training set has {len(data.train.rows)} rows, fewer than "
                               f"--batch-size {config.batch_size}")  # fmt: skip
        self.val_batches = self._validation_batches()
        self.optimizer = optim.Adam(learning_rate=config.learning_rate)
        self.step = 0
        self.saved_step: int | None = None  # the step of the latest save (what --resume reads)
        self.val_loss: float | None = None
        self.tokens, self.seconds, self.steps_run = 0, 0.0, 0
        self.identity = {"train": self.config.identity(), "adapter": adapter_config,
                         "data": fingerprint(data.train.rows)}  # fmt: skip
        self._value_and_grad = nn.value_and_grad(model, loss_fn)

    def _validation_batches(self) -> list[list[Row]]:
        valid = self.data.valid
        if valid is None or not valid.learned:
            return []
        rows = [r for r in valid.rows if r.learned]
        size = min(self.config.batch_size, len(rows))
        batches = [[rows[i] for i in b] for b in batch_order(rows, size)]
        limit = self.config.val_batches
        return batches if limit < 0 else batches[:limit]

    def batch(self, step: int) -> list[Row]:
        """The rows of step `step` (0-based)."""
        epoch, index = divmod(step, len(self.batches))
        rows = self.data.train.rows
        return [rows[i] for i in epoch_batches(self.batches, self.config.seed, epoch)[index]]

    def step_grads(self, rows: list[Row]) -> tuple[mx.array, mx.array, dict]:
        """(loss, learned tokens, gradients of the LoRA parameters) for one batch."""
        (loss, ntoks), grads = self._value_and_grad(self.model, *pad(rows))
        return loss, ntoks, grads

    def train_step(self) -> float:
        rows = self.batch(self.step)
        mx.random.seed((self.config.seed * 1_000_003 + self.step) % 2**63)  # dropout: per step
        start = time.perf_counter()
        loss, ntoks, grads = self.step_grads(rows)
        if ntoks.item() > 0:  # a batch of rows with nothing to learn leaves the weights as they are
            self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, loss)
        self.seconds += time.perf_counter() - start
        self.tokens += sum(len(r.ids) - 1 for r in rows)
        self.step += 1
        return loss.item() if ntoks.item() > 0 else math.nan

    def validate(self) -> float | None:
        if not self.val_batches:
            return None
        total, count = 0.0, 0.0
        for rows in self.val_batches:
            loss, ntoks = loss_fn(self.model, *pad(rows))
            mx.eval(loss, ntoks)
            total += loss.item() * ntoks.item()
            count += ntoks.item()
        self.val_loss = total / count
        return self.val_loss

    def progress(self, loss: float | None, event: str) -> Progress:
        tps = self.tokens / self.seconds if self.seconds else 0.0
        per_step = self.seconds / self.steps_run if self.steps_run else None
        eta = None if per_step is None else per_step * (self.config.iters - self.step)
        return Progress(self.step, self.config.iters, loss, self.val_loss, tps, eta,
                        mx.get_peak_memory(), event)  # fmt: skip

    def run(self, resume: bool = False) -> None:
        """Train to `config.iters` steps (from the saved state with `resume`)."""
        if resume:
            self.load_state()
        else:
            self.optimizer.init(self.model.trainable_parameters())
            self.save()  # the config is there from the start, as mlx_lm.lora writes it
        self.steps_run, first = 0, self.step
        self.validate()
        self.report(self.progress(None, "eval"))
        while self.step < self.config.iters:
            loss = self.train_step()
            self.steps_run = self.step - first
            self.report(self.progress(loss, "step"))
            last = self.step == self.config.iters
            if self.step % self.config.steps_per_eval == 0 or last:
                self.validate()
                self.report(self.progress(loss, "eval"))
            if self.step % self.config.save_every == 0 or last:
                self.save()
                self.report(self.progress(loss, "save"))

    def save(self) -> None:
        """The adapter files and the state file, each written atomically (state last)."""
        save_adapter(self.model, self.adapter_path, self.adapter_config)
        arrays = {f"adapter.{k}": v for k, v in adapter_weights(self.model).items()}
        arrays |= {f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)}
        metadata = {"step": str(self.step), "identity": json.dumps(self.identity, sort_keys=True),
                    "epoch_and_batch": json.dumps(divmod(self.step, len(self.batches)))}  # fmt: skip
        path = self.adapter_path / STATE_FILE
        write_atomic(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=metadata))
        self.saved_step = self.step

    def load_state(self) -> None:
        path = self.adapter_path / STATE_FILE
        if not path.is_file():
            raise MixchatError(f"nothing to resume: {path} does not exist")
        try:
            arrays, metadata = mx.load(str(path), return_metadata=True)
            identity = json.loads(metadata["identity"])
            step = int(metadata["step"])
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise MixchatError(f"cannot resume from {path}: {e}") from None
        if identity != json.loads(json.dumps(self.identity, sort_keys=True)):
            changed = sorted(k for k in {**identity["train"], **self.identity["train"]}
                             if identity["train"].get(k) != self.identity["train"].get(k))  # fmt: skip
            if identity["data"] != self.identity["data"]:
                changed.append("the training data")
            what = ", ".join(changed) or "the adapter settings"
            raise MixchatError(f"--resume needs the same run as {path} was saved from ({what} "
                               "changed)")  # fmt: skip
        if step > self.config.iters:
            raise MixchatError(f"the saved run is at step {step}, past --iters {self.config.iters}")
        adapter = [(k[len("adapter.") :], v) for k, v in arrays.items() if k.startswith("adapter.")]
        self.model.load_weights(adapter, strict=False)
        state = [
            (k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")
        ]
        self.optimizer.state = tree_unflatten(state)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.step = self.saved_step = step


def evaluate(trainer_class: type[Trainer], model: nn.Module, rows: list[Row], batch_size: int,
             num_batches: int) -> float | None:  # fmt: skip
    """mlx_lm.lora's --test: the mean loss over the learned tokens of the first `num_batches`
    batches (-1: all) of `batch_size` rows sorted by length, in order, measured as
    `trainer_class` validates (layer by layer for a StreamedTrainer); no training set needed.
    None when no row has anything to learn."""
    rows = [r for r in rows if r.learned]
    if not rows:
        return None
    batches = [[rows[i] for i in b] for b in batch_order(rows, min(batch_size, len(rows)))]
    evaluator = trainer_class.__new__(trainer_class)  # validate reads the model and batches only
    evaluator.model = model
    evaluator.val_batches = batches if num_batches < 0 else batches[:num_batches]
    return evaluator.validate()
