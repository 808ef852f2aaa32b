"""Streamed evaluation of two models over the same tokens, one layer at a time.

Both models are advanced together: the embedding rows of the tokens, then for each layer i the
reference's layer i is read, the reference's hidden states [1, T, hidden] go through it, it is
freed, and the same for the candidate. MoE experts are applied one at a time (a Mixtral-8x7B
layer's experts are 5.6 GB in float32; one expert is 0.7 GB), and each layer's router choices
are compared as they come. The final norm and LM head run in slices of the vocabulary, with the
log-softmax statistics accumulated online (running max and sum of exponentials), so the [T, vocab]
logits of the two models never exist whole. Memory: one layer of one model (one expert of it),
each model's LM head as stored, the hidden states of both, and one [T, slice] block of logits.

Each layer runs through the model's own modules (model.mixtral: Block's attention, norms and
dense MLP, the router of its SparseMoE, Experts holding one expert at a time; the MoE families:
mlx-lm's own layers and ends, quantize/family_eval.py). Weights come in
through quantize/lazy_weights.py (float checkpoints as `mixchat quantize` reads them, quantized
directories and GGUF files as mixchat's loader reads them). Quantized tensors are dequantized
into the compute dtype (float32 on the CPU) module by module, which gives the numbers of the
whole model loaded and dequantized in memory (quantize/report.py's old way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from model import blas
from model.errors import CheckpointError, MixchatError
from model.mixtral import Block, Experts, create_attention_mask
from model.names import experts_module
from model.router import route

from . import family_eval
from .lazy_weights import Weights
from .module_weights import as_compute as _as_compute
from .module_weights import load_module as _load

# Logits are computed in [T, rows] blocks of at most this many elements (16 MB in float32).
SLICE_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- modules


def _rows(w: Weights, prefix: str, rows: slice | mx.array, in_dims: int) -> mx.array:
    """Rows of a [vocab, hidden] matrix (embedding or LM head), dequantized, in compute dtype."""
    tensors = w.take(prefix)
    table = {n: a[rows] for n, a in tensors.items()}
    n_rows = next(iter(table.values())).shape[0]
    like = nn.Linear(in_dims, n_rows, bias=False)
    return _as_compute(table, like, prefix, w.args, w.dtype)[f"{prefix}.weight"]


class _Head:
    """A model's LM head kept as stored (quantized or half), dequantized one slice at a time;
    its bias added (PhiMoE) and the logits divided by `scale` (GraniteMoE's logits_scaling)."""

    def __init__(self, w: Weights, scale: float = 1.0):
        args = w.args
        self.prefix = "model.embed_tokens" if args.tie_word_embeddings else "lm_head"
        self.tensors = w.take(self.prefix)
        if f"{self.prefix}.weight" not in self.tensors:
            raise CheckpointError(f"checkpoint lacks tensor {self.prefix}.weight")
        mx.eval(self.tensors)
        self.w, self.scale = w, scale

    def logits(self, h: mx.array, a: int, b: int) -> mx.array:
        """h [N, hidden] -> logits [N, b - a] for vocabulary entries a..b-1 (float32)."""
        table = {n: t[a:b] for n, t in self.tensors.items()}
        like = nn.Linear(self.w.args.hidden_size, b - a, bias=False)
        ready = _as_compute(table, like, self.prefix, self.w.args, self.w.dtype)
        weight, bias = ready[f"{self.prefix}.weight"], ready.get(f"{self.prefix}.bias")
        if weight.shape != (b - a, self.w.args.hidden_size):
            raise CheckpointError(f"tensor {self.prefix}.weight has the wrong shape")
        if blas.applies(h.shape[0], *weight.shape, weight.dtype):  # CPU: numpy's BLAS
            out = blas.linear(h.astype(mx.float32), weight)
        else:
            out = (h @ weight.T).astype(mx.float32)
        if bias is not None:
            out = out + bias.astype(mx.float32)
        return out / self.scale if self.scale != 1.0 else out


# ----------------------------------------------------------------------------- running


def _route(moe: nn.Module, x: mx.array) -> tuple[mx.array, mx.array]:
    """The router's top-k experts and their weights, as model.mixtral.SparseMoE computes them."""
    return route(moe.gate(x), moe.top_k)


def run_layer(
    w: Weights, i: int, h: mx.array, mask: Any, step: Callable[[], None] | None = None
) -> tuple[mx.array, np.ndarray | None]:
    """h [1, T, hidden] through layer i of `w` -> (new h, expert choices [T, k] or None): the
    model's own Block (model.mixtral), its experts read and applied one at a time."""
    args = w.args
    if args.is_family:  # mlx-lm's own layer, masked as mlx-lm's model masks it
        return family_eval.run_family_layer(w, i, h, step)
    prefix = f"model.layers.{i}"
    block = Block(args)
    if args.is_moe:
        del block.block_sparse_moe["switch_mlp"]  # applied one expert at a time below
    _load(block, prefix, w.take(prefix), args, w.dtype)
    if not args.is_moe:
        out = block(h, mask, None, None)
        mx.eval(out)
        return out, None
    h = h + block.self_attn(block.input_layernorm(h), mask, None)  # Block's first half
    x = block.post_attention_layernorm(h)[0]  # [T, hidden]
    inds, gates = _route(block.block_sparse_moe, x)  # [T, k] each
    mx.eval(h, x, inds, gates)
    del block
    mx.clear_cache()
    choices = np.array(inds)
    y = _experts_one_at_a_time(w, i, x, choices, step)  # [T, k, hidden]
    # The router-weighted sum of each token's experts, as model.mixtral.SparseMoE adds them.
    return h + (y * gates[..., None]).sum(axis=-2)[None], choices


def _experts_one_at_a_time(
    w: Weights, i: int, x: mx.array, choices: np.ndarray, step: Callable[[], None] | None
) -> mx.array:
    """Every token of x [T, hidden] through each of its chosen experts choices [T, k] ->
    [T, k, hidden], through model.mixtral.Experts holding one expert of layer i at a time."""
    args = w.args
    y = mx.zeros((*choices.shape, x.shape[-1]), dtype=x.dtype)
    for e in range(args.num_local_experts):
        tokens, slots = np.nonzero(choices == e)
        if len(tokens):
            experts = Experts(args.hidden_size, args.intermediate_size, 1)
            _load(experts, experts_module(i), w.take_expert(i, e), args, w.dtype)
            rows = mx.array(tokens)
            out = experts(x[rows], mx.zeros((len(tokens), 1), dtype=mx.uint32))  # [n, 1, H]
            y = y.at[rows, mx.array(slots)].add(out[:, 0])
            mx.eval(y)
            del experts, out
            mx.clear_cache()
        if step:
            step()
    return y


@dataclass
class Comparison:
    """Next-token statistics of a candidate model against a reference on the same tokens."""

    tokens: int
    perplexity_reference: float
    perplexity_candidate: float
    kl_divergence: float  # mean KL(reference || candidate), nats per predicted token
    top1_agreement: float  # share of positions where both models' most likely token is the same
    router_agreement: float | None  # share of token x layer expert sets unchanged; None: dense

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LogSoftmaxStats:
    """Per-position running max, sum of exp, target logit and argmax over vocabulary slices."""

    def __init__(self, n: int):
        self.max = np.full(n, -np.inf)
        self.sum = np.zeros(n)
        self.target = np.zeros(n)
        self.best = np.full(n, -np.inf)
        self.argmax = np.zeros(n, dtype=np.int64)

    def add(self, logits: np.ndarray, a: int, targets: np.ndarray) -> np.ndarray:
        """Fold in logits [n, rows] of vocabulary a..; returns the rescale factor of `sum`."""
        m = np.maximum(self.max, logits.max(axis=1))
        scale = np.exp(self.max - m)
        self.sum = self.sum * scale + np.exp(logits - m[:, None]).sum(axis=1)
        self.max = m
        inside = (targets >= a) & (targets < a + logits.shape[1])
        self.target[inside] = logits[inside, targets[inside] - a]
        arg = logits.argmax(axis=1)
        val = logits[np.arange(len(arg)), arg]
        better = val > self.best
        self.best[better], self.argmax[better] = val[better], arg[better] + a
        return scale

    @property
    def logsumexp(self) -> np.ndarray:
        return self.max + np.log(self.sum)


def vocabulary_slices(vocab: int, hidden: int, positions: int) -> list[tuple[int, int]]:
    """Vocabulary ranges whose [positions, rows] float32 logits stay under SLICE_ELEMENTS and
    under a quarter of the LM head's own size."""
    rows = max(1, min(SLICE_ELEMENTS, vocab * hidden // 4) // max(positions, 1))
    return [(a, min(a + rows, vocab)) for a in range(0, vocab, rows)]


def token_statistics(
    blocks: Iterable[tuple[int, np.ndarray, np.ndarray]], targets: np.ndarray
) -> tuple[float, float, float, float]:
    """(perplexity of p, perplexity of q, mean KL(p || q), top-1 agreement) from blocks
    (a, logits_p [n, rows], logits_q [n, rows]) covering the vocabulary from entry a on, in
    order; `targets` [n] the next tokens. Nothing of size [n, vocab] is kept:
    KL = sum_v exp(lp_v - m_p) (lp_v - lq_v) / Z_p - logsumexp(lp) + logsumexp(lq)."""
    n = len(targets)
    p, q = _LogSoftmaxStats(n), _LogSoftmaxStats(n)
    cross = np.zeros(n)  # sum of exp(lp_v - p.max) * (lp_v - lq_v), rescaled as p.max grows
    for a, lp, lq in blocks:
        scale = p.add(lp, a, targets)
        q.add(lq, a, targets)
        cross = cross * scale + (np.exp(lp - p.max[:, None]) * (lp - lq)).sum(axis=1)
    lse_p, lse_q = p.logsumexp, q.logsumexp
    kl = cross / p.sum - lse_p + lse_q
    return (
        float(np.exp((lse_p - p.target).mean())),
        float(np.exp((lse_q - q.target).mean())),
        float(kl.mean()),
        float((p.argmax == q.argmax).mean()),
    )


def evaluate(
    reference: Weights,
    candidate: Weights,
    ids: list[int],
    progress: Callable[[str, int], None] | None = None,
) -> Comparison:
    """Stream both models over `ids` (see the module docstring). `progress(what, total)` is
    called once per step (a model's embedding, layer, expert or head), `total` the step count."""
    check_compatible(reference, candidate)
    args = reference.args
    if len(ids) < 2:
        raise MixchatError("the evaluation text needs at least 2 tokens")
    if max(ids) >= args.vocab_size or min(ids) < 0:
        raise MixchatError(f"token id {max(ids)} is outside the vocabulary of {args.vocab_size}")
    per_layer = 1 + (args.num_local_experts if args.is_moe else 0)
    total = 2 * (2 + args.num_hidden_layers * per_layer)

    def step(what: str) -> Callable[[], None]:
        return lambda: progress(what, total) if progress else None

    models = (reference, candidate)
    scales = [family_eval.scales(w) for w in models]  # embedding's multiplier, logits' divisor
    tokens = mx.array(ids)
    hidden = []
    for w, (embedding_scale, _) in zip(models, scales):
        h = _rows(w, "model.embed_tokens", tokens, args.hidden_size)[None]  # [1, T, hidden]
        if embedding_scale != 1.0:
            h = h * embedding_scale
        mx.eval(h)
        hidden.append(h)
        step("embedding")()
    masks = [
        create_attention_mask(h, None, window_size=w.args.sliding_window)
        for h, w in zip(hidden, models)
    ]
    same = routed = 0
    for i in range(args.num_hidden_layers):
        routes = []
        for k, w in enumerate(models):
            on_expert = step(f"layer {i + 1}/{args.num_hidden_layers}")
            hidden[k], choice = run_layer(w, i, hidden[k], masks[k], on_expert)
            routes.append(choice)
            on_expert()
            mx.clear_cache()
        if routes[0] is not None:
            routed += 1
            same += int(np.all(np.sort(routes[0], -1) == np.sort(routes[1], -1), axis=-1).sum())
    # Next-token predictions: positions 0..T-2 predict ids[1:].
    n = len(ids) - 1
    targets = np.asarray(ids[1:])
    normed, heads = [], []
    for k, w in enumerate(models):
        normed.append(family_eval.final_norm(w)(hidden[k][0, :n]))  # the model's own norm
        heads.append(_Head(w, scales[k][1]))
        mx.eval(normed[-1])
    hidden.clear()

    def blocks() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for a, b in vocabulary_slices(args.vocab_size, args.hidden_size, n):
            lp = np.array(heads[0].logits(normed[0], a, b), dtype=np.float64)
            lq = np.array(heads[1].logits(normed[1], a, b), dtype=np.float64)
            mx.clear_cache()
            yield a, lp, lq

    ppl_p, ppl_q, kl, top1 = token_statistics(blocks(), targets)
    for _ in models:
        step("LM head")()
    positions = len(ids) * max(routed, 1)  # token x routed layer (DeepSeek's first are dense)
    return Comparison(
        tokens=len(ids),
        perplexity_reference=ppl_p,
        perplexity_candidate=ppl_q,
        kl_divergence=kl,
        top1_agreement=top1,
        router_agreement=same / positions if args.is_moe else None,
    )


def check_compatible(reference: Weights, candidate: Weights) -> None:
    """One-line errors when the two models cannot be compared token for token."""
    a, b = reference.args, candidate.args
    if a.vocab_size != b.vocab_size:
        raise MixchatError(
            f"different vocabularies: {reference.name} has {a.vocab_size} tokens, "
            f"{candidate.name} has {b.vocab_size}"
        )
    fields = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_local_experts",
    )
    if a.is_moe:
        fields += ("num_experts_per_tok",)
    for f in fields:
        if getattr(a, f) != getattr(b, f):
            raise MixchatError(
                f"different architectures: {f} is {getattr(a, f)} in {reference.name} and "
                f"{getattr(b, f)} in {candidate.name}"
            )
