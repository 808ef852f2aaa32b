"""Streamed evaluation (quantize/evaluate.py) and `mixchat compare`: the streamed numbers equal
the whole models run in memory, compare's numbers equal a direct computation, mismatched models
give one-line errors, and the report runs with far less memory than the source needs."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from model.weights import locate
from quantize.cli import main
from quantize.evaluate import evaluate, token_statistics
from quantize.lazy_weights import CheckpointWeights, SourceWeights
from quantize.report import eval_text, text_ids
from quantize.sources import open_source
from tests.checkpoints import build_hf_checkpoint

TEXT = "Le chat dort sur le canapé. The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(scope="module")
def moe_src(tiny_mixtral_bf16_shards) -> Path:
    """Tiny bf16 Mixtral in 2 MB shards (intermediate 128 so every matrix quantizes; the
    session's, shared with test_quantize.py)."""
    return tiny_mixtral_bf16_shards


@pytest.fixture(scope="module")
def moe_q4(moe_src, tmp_path_factory) -> Path:
    """`moe_src` at 4 bits, 3-bit experts, 8-bit router (every dequantization path)."""
    dst = tmp_path_factory.mktemp("q") / "q4"
    argv = ["quantize", str(moe_src), str(dst), "--expert-bits", "3", "--router-bits", "8"]
    assert main([*argv, "--no-eval", "--quiet"]) == 0
    return dst


def in_memory(reference: Path, candidate: Path, ids: list[int]) -> dict:
    """Both models loaded whole (dequantized to float32, as the old report did), numpy stats."""
    from mlx_lm.utils import dequantize_model

    from model import load

    outs = []
    for path in (reference, candidate):
        if outs and path == reference:  # one model against itself: the same numbers twice
            outs.append(outs[0])
            continue
        model, _ = load(path)
        dequantize_model(model)
        model.routing = []
        logits = np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
        routes = [np.array(r[0]) for r in model.routing]
        outs.append((logits[:-1], np.stack(routes) if routes else None))
        del model

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    (lp, rp), (lq, rq) = [(log_softmax(x), r) for x, r in outs]
    rows, nxt = np.arange(len(ids) - 1), np.asarray(ids[1:])
    router = None
    if rp is not None:
        router = float(np.all(np.sort(rp, -1) == np.sort(rq, -1), axis=-1).mean())
    return {
        "tokens": len(ids),
        "perplexity_reference": float(np.exp(-lp[rows, nxt].mean())),
        "perplexity_candidate": float(np.exp(-lq[rows, nxt].mean())),
        "kl_divergence": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
        "top1_agreement": float((lp.argmax(-1) == lq.argmax(-1)).mean()),
        "router_agreement": router,
    }


def assert_same_numbers(got: dict, want: dict) -> None:
    assert got["tokens"] == want["tokens"]
    for key in ("perplexity_reference", "perplexity_candidate", "kl_divergence"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["top1_agreement"] == want["top1_agreement"]
    assert got["router_agreement"] == want["router_agreement"]


def ids_of(path: Path, text: str, max_tokens: int | None = None) -> list[int]:
    from model.tokenizer import load_tokenizer

    return text_ids(load_tokenizer(path), text, max_tokens)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mixchat: error: ")
    return lines[0]


# ----------------------------------------------------------------------------- streamed == whole


def test_streamed_report_equals_in_memory_moe(moe_src, moe_q4):
    ids = ids_of(moe_src, eval_text())
    steps = []
    got = evaluate(
        SourceWeights(open_source(moe_src)),
        CheckpointWeights(locate(moe_q4)),
        ids,
        lambda what, total: steps.append((what, total)),
    )
    want = in_memory(moe_src, moe_q4, ids)
    assert_same_numbers(got.as_dict(), want)
    assert 0 < got.kl_divergence and 0 < got.router_agreement < 1 and 0 < got.top1_agreement < 1
    # embedding, 2 layers x (attention + 4 experts), head; for both models
    assert len(steps) == steps[0][1] == 2 * (2 + 2 * 5)


def test_streamed_equals_in_memory_dense_tied_windowed(tmp_path):
    """Dense Mistral, tied embeddings (the head is the embedding), an 8-token sliding window."""
    src = build_hf_checkpoint(
        tmp_path / "src", "mistral", dtype="bfloat16", sliding_window=8,
        tie_word_embeddings=True, intermediate_size=128, seed=3,
    )  # fmt: skip
    dst = tmp_path / "q"
    assert main(["quantize", str(src), str(dst), "--no-eval", "--quiet"]) == 0
    (tmp_path / "text.txt").write_text(TEXT)
    got = json.loads(_compare_json(src, dst, "--text", str(tmp_path / "text.txt")))
    assert got["router_agreement"] is None and got["kl_divergence"] > 0
    assert_same_numbers(got, in_memory(src, dst, ids_of(src, TEXT)))


def _compare_json(ref: Path, cand: Path, *extra: str) -> str:
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["compare", str(ref), str(cand), "--json", "--quiet", *extra]) == 0
    return out.getvalue()


# ----------------------------------------------------------------------------- mixchat compare


def test_compare_json_equals_direct_computation(moe_src, moe_q4, tmp_path, capsys):
    """Quantized against quantized (an 8-bit reference), on the user's file, cut at --max-tokens."""
    q8 = tmp_path / "q8"
    assert main(["quantize", str(moe_src), str(q8), "--bits", "8", "--no-eval", "--quiet"]) == 0
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    capsys.readouterr()
    code = main(
        ["compare", str(q8), str(moe_q4), "--text", str(text), "--max-tokens", "40", "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    got = json.loads(out)
    assert sorted(got) == sorted(
        ["tokens", "perplexity_reference", "perplexity_candidate", "kl_divergence",
         "top1_agreement", "router_agreement"]
    )  # fmt: skip
    ids = ids_of(moe_src, TEXT, 40)
    assert len(ids) == 40 and ids[0] == 1
    assert_same_numbers(got, in_memory(q8, moe_q4, ids))

    assert main(["compare", str(q8), str(moe_q4), "--text", str(text)]) == 0
    out, _ = capsys.readouterr()
    assert "KL divergence" in out and "router" in out and f"({len(ids_of(q8, TEXT))} tokens)" in out


def test_compare_a_model_with_itself_is_exact(moe_src, capsys):
    got = json.loads(_compare_json(moe_src, moe_src, "--max-tokens", "32"))
    assert got["kl_divergence"] == pytest.approx(0, abs=1e-9)
    assert got["top1_agreement"] == 1 and got["router_agreement"] == 1
    assert got["perplexity_reference"] == got["perplexity_candidate"]


def test_different_vocabularies_one_line_error(moe_src, tmp_path, capsys):
    v3 = build_hf_checkpoint(tmp_path / "v3", "mixtral", tokenizer="v3", intermediate_size=128)
    capsys.readouterr()
    assert main(["compare", str(moe_src), str(v3)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "different vocabularies" in line and "32000" in line and "32768" in line


def test_different_architectures_one_line_error(moe_src, tmp_path, capsys):
    three = build_hf_checkpoint(tmp_path / "l3", "mixtral", num_layers=3, intermediate_size=128)
    capsys.readouterr()
    assert main(["compare", str(moe_src), str(three)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "different architectures: num_hidden_layers is 2" in line and "3 in" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--text", "{tmp}/missing.txt"], "missing.txt: no such file"),
        (["--text", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text"),
    ],
)
def test_bad_text_file_one_line_error(moe_src, tmp_path, capsys, argv, message):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["compare", str(moe_src), str(moe_src), *argv]) == 1
    assert message in one_error_line(capsys.readouterr().err)


def test_missing_candidate_one_line_error(moe_src, tmp_path, capsys):
    assert main(["compare", str(moe_src), str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- memory


def test_report_runs_for_a_source_larger_than_the_memory_it_gets(tmp_path, capsys):
    """The old report held the whole source in float32 (2x its bf16 size) and skipped itself
    when that did not fit; the streamed one reads one expert at a time, so its MLX peak stays
    below the source's own size on disk, and the report is written."""
    src = build_hf_checkpoint(
        tmp_path / "src", "mixtral", dtype="bfloat16", intermediate_size=1024, num_experts=8
    )
    source_bytes = open_source(src).total_bytes
    dst = tmp_path / "q"
    gc.collect()  # models earlier tests left for the collector: not this run's memory
    mx.clear_cache()
    mx.reset_peak_memory()
    assert main(["quantize", str(src), str(dst)]) == 0
    peak = mx.get_peak_memory()
    report = json.loads((dst / "quantization_report.json").read_text())
    assert report["tokens"] > 300 and report["kl_divergence"] > 0
    assert "top1_agreement" in report and report["router_agreement"] is not None
    assert peak < 0.6 * source_bytes, (peak, source_bytes)


def test_token_statistics_known_numbers():
    """Hand-checkable: two positions, vocabulary of two, fed as two one-entry slices."""
    lp = np.log([[0.5, 0.5], [0.5, 0.5]])
    lq = np.log([[0.25, 0.75], [0.5, 0.5]])
    targets = np.array([1, 0])
    blocks = [(0, lp[:, :1] + 3.0, lq[:, :1] - 1.0), (1, lp[:, 1:] + 3.0, lq[:, 1:] - 1.0)]
    ppl_p, ppl_q, kl, top1 = token_statistics(iter(blocks), targets)
    assert ppl_p == pytest.approx(2.0)
    assert ppl_q == pytest.approx(1 / np.sqrt(0.75 * 0.5))
    assert kl == pytest.approx((0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)) / 2)
    assert top1 == 0.5  # position 0: p ties (first entry), q prefers entry 1


@pytest.mark.parametrize("layout", ["stacked", "block_sparse_moe"])
def test_mistral_format_source_equals_its_hf_original(moe_src, tmp_path, layout):
    """Mistral's own layout (renamed tensors, interleaved-RoPE Q/K, experts stacked along rows
    in the first release) streams to exactly the model its HF original is."""
    from tests.test_quantize import to_mistral_format

    mistral = to_mistral_format(moe_src, tmp_path / "mistral", layout=layout, shards=2)
    got = json.loads(_compare_json(moe_src, mistral, "--max-tokens", "48"))
    assert got["tokens"] == 48
    assert got["kl_divergence"] == pytest.approx(0, abs=1e-9)
    assert got["top1_agreement"] == 1 and got["router_agreement"] == 1


def test_gguf_streamed_equals_in_memory(default_model_path):
    """The embedded SmolLM2 GGUF (Q4_1, tied head) streamed tensor by tensor through model.gguf:
    its perplexity is the whole model's."""
    from model.tokenizer import load_tokenizer

    checkpoint = locate(default_model_path)
    ids = text_ids(load_tokenizer(checkpoint.gguf_metadata), TEXT, 24)
    weights = CheckpointWeights(checkpoint)
    got = evaluate(weights, weights, ids).as_dict()
    assert_same_numbers(got, in_memory(default_model_path, default_model_path, ids))
    assert got["kl_divergence"] == pytest.approx(0, abs=1e-9)
