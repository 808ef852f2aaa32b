"""`mixchat compare` (and quantize's quality report) for granitemoe and phimoe, on the tiny
checkpoints of tests/test_family_more.py: each layer is mlx-lm's own, and the model's ends are
its own too (GraniteMoE's embedding multiplier and logits_scaling, PhiMoE's LayerNorm final norm
and lm_head bias). The reference perplexity is transformers'; a 4-bit copy's numbers are the
engine's whole-model ones (perplexities, KL, top-1 and router agreement) on the same tokens."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from model import Engine

TEXT = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from tests.test_family_deepseek import build_checkpoint
    from tests.test_family_more import COMMON, FAMILIES, published

    root = tmp_path_factory.mktemp("family-compare-more")
    return {
        family: build_checkpoint(root / family, prefix, {**COMMON, **extra}, fix=published)
        for family, (prefix, extra) in FAMILIES.items()
    }


def _engine_statistics(reference: str, candidate: str, ids: list[int]) -> dict:
    """compare's statistics from the two models loaded whole and run by the engine."""
    log_probs, routes = [], []
    for path in (reference, candidate):
        model = Engine.load(path).model
        model.routing = []
        logits = model(mx.array([ids])).astype(mx.float32)[0, :-1]
        log_probs.append(np.array(logits - mx.logsumexp(logits, -1, keepdims=True), np.float64))
        routes.append([np.sort(np.array(r).reshape(len(ids), -1), -1) for r in model.routing])
    targets = np.array(ids[1:])
    p, q = log_probs
    same = sum(int(np.all(a == b, -1).sum()) for a, b in zip(*routes))
    return dict(
        perplexity_reference=float(np.exp(-p[np.arange(len(targets)), targets].mean())),
        perplexity_candidate=float(np.exp(-q[np.arange(len(targets)), targets].mean())),
        kl_divergence=float((np.exp(p) * (p - q)).sum(-1).mean()),
        top1_agreement=float((p.argmax(-1) == q.argmax(-1)).mean()),
        router_agreement=same / (len(ids) * len(routes[0])),
    )


@pytest.mark.parametrize("family", ["granitemoe", "phimoe"])
def test_compare_runs_the_familys_own_ends(sources, tmp_path, family, capsys):
    import torch

    from quantize.cli import main
    from quantize.compare import compare_models
    from quantize.report import text_ids
    from tests.test_families import transformers_model

    src = str(sources[family])
    itself = compare_models(src, src, TEXT, max_tokens=32)
    assert itself.kl_divergence == pytest.approx(0, abs=1e-6)
    assert itself.top1_agreement == 1 and itself.router_agreement == 1
    ids = text_ids(Engine.load(src).tokenizer, TEXT, 32)
    with torch.no_grad():
        logits = transformers_model(src)(torch.tensor([ids])).logits[0, :-1].double()
    nll = -torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert itself.perplexity_reference == pytest.approx(float(nll.mean().exp()), rel=1e-3)

    out = tmp_path / "q"
    assert main(["quantize", src, str(out), "--quiet"]) == 0  # evaluated against the source
    assert "quality report failed" not in capsys.readouterr().err
    quantized = compare_models(src, str(out), TEXT, max_tokens=32)
    assert np.isfinite(quantized.perplexity_candidate) and quantized.kl_divergence > 1e-4
    assert 0 < quantized.router_agreement < 1
    expected = _engine_statistics(src, str(out), ids)
    for name, value in expected.items():  # a small KL's float32 rounding: its 2%
        rel = 2e-2 if name == "kl_divergence" else 1e-3
        assert getattr(quantized, name) == pytest.approx(value, rel=rel), name


@pytest.fixture(scope="module")
def gptoss(tmp_path_factory):
    """tests/test_family_gptoss.py's checkpoints (float, MXFP4 as published, transformers'
    float reading of the MXFP4 one) and mlx_lm.convert's: the MXFP4 experts kept (`mxfp4`
    mode), and everything in 4-bit affine groups."""
    import mlx_lm

    from tests.test_family_gptoss import build_gptoss

    root = tmp_path_factory.mktemp("gptoss-compare")
    dirs = build_gptoss(root)
    mlx_lm.convert(str(dirs["mxfp4"]), str(root / "mlx_mxfp4"))
    mlx_lm.convert(str(dirs["mxfp4"]), str(root / "f"), dequantize=True)
    mlx_lm.convert(str(root / "f"), str(root / "4bit"), quantize=True, q_bits=4, q_group_size=32)
    return {**dirs, "mlx_mxfp4": root / "mlx_mxfp4", "4bit": root / "4bit"}


def test_compare_runs_gpt_oss_as_published_and_converted(gptoss):
    """gpt-oss (sliding layers masked to their window of 4, attention sinks, biased experts,
    YaRN): float and MXFP4 as published give transformers' perplexity; mlx_lm.convert's MXFP4
    directory holds the same weights (KL 0); its 4-bit affine one gives the engine's numbers."""
    import torch

    from quantize.compare import compare_models
    from quantize.report import text_ids
    from tests.test_families import transformers_model

    ids = text_ids(Engine.load(str(gptoss["float"])).tokenizer, TEXT, 32)
    assert len(ids) > 2 * 4  # past the sliding window
    for form, reference in (("float", "float"), ("mxfp4", "reference")):
        itself = compare_models(str(gptoss[form]), str(gptoss[form]), TEXT, max_tokens=32)
        with torch.no_grad():
            logits = transformers_model(gptoss[reference])(torch.tensor([ids])).logits[0, :-1]
        nll = -torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), ids[1:]]
        assert itself.perplexity_reference == pytest.approx(float(nll.mean().exp()), rel=1e-3)
    converted = compare_models(str(gptoss["mxfp4"]), str(gptoss["mlx_mxfp4"]), TEXT, 32)
    assert converted.kl_divergence == pytest.approx(0, abs=1e-6)
    assert converted.top1_agreement == 1 and converted.router_agreement == 1
    quantized = compare_models(str(gptoss["float"]), str(gptoss["4bit"]), TEXT, max_tokens=32)
    assert quantized.kl_divergence > 1e-4 and 0 < quantized.router_agreement < 1
    expected = _engine_statistics(str(gptoss["float"]), str(gptoss["4bit"]), ids)
    for name, value in expected.items():
        rel = 2e-2 if name == "kl_divergence" else 1e-3
        assert getattr(quantized, name) == pytest.approx(value, rel=rel), name
