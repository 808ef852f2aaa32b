"""`mixchat quantize` and `mixchat compare` for the families added last (gpt_oss float and
MXFP4 as published, deepseek_v3, deepseek_v2, granitemoe, phimoe), on the tiny checkpoints of
their own tests (tests/test_family_gptoss.py, test_family_deepseek.py, test_family_more.py).
The reference is mlx-lm's own conversion (`mlx_lm.convert -q`) and generation
(`stream_generate`); compare's, transformers' perplexity and the engine's whole-model numbers."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from model import Engine
from tests.test_families import PROMPT, TOKENS, _reply
from tests.test_family_tools import assert_compare_with_itself

COMPARE_TEXT = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from tests.test_family_deepseek import FAMILIES as DEEPSEEK
    from tests.test_family_deepseek import MLA, build_checkpoint, deepseek_config
    from tests.test_family_gptoss import build_gptoss
    from tests.test_family_more import COMMON, published
    from tests.test_family_more import FAMILIES as MORE

    root = tmp_path_factory.mktemp("family-tools-more")
    gptoss = build_gptoss(root / "gpt_oss")
    dirs = {"gpt_oss": gptoss["float"], "gpt_oss_mxfp4": gptoss["mxfp4"],
            "gpt_oss_reference": gptoss["reference"]}  # fmt: skip
    for family, (prefix, extra) in DEEPSEEK.items():
        dirs[family] = build_checkpoint(
            root / family, prefix, {**MLA, **extra}, fix=deepseek_config
        )
    for family, (prefix, extra) in MORE.items():
        dirs[family] = build_checkpoint(root / family, prefix, {**COMMON, **extra}, fix=published)
    return dirs


def _assert_same_conversion(out, ref) -> None:
    """The same tensors (names, dtypes, values) and per-module quantization config."""
    ours = json.loads((out / "config.json").read_text())["quantization"]
    theirs = json.loads((ref / "config.json").read_text())["quantization"]
    assert {k: ours.get(k) for k in ("bits", "group_size")} == {
        k: theirs.get(k) for k in ("bits", "group_size")
    }
    for name, choice in theirs.items():
        if isinstance(choice, dict):
            assert {k: (ours.get(name) or {}).get(k) for k in choice} == choice, name
    for name, choice in ours.items():
        if isinstance(choice, dict):
            assert theirs.get(name) == choice or {
                k: theirs.get(name, {}).get(k) for k in ("bits", "group_size")
            } == {k: choice.get(k) for k in ("bits", "group_size")}, name
    written, expected = {}, {}
    for file in out.glob("*.safetensors"):
        written.update(mx.load(str(file)))
    for file in ref.glob("*.safetensors"):
        expected.update(mx.load(str(file)))
    assert sorted(written) == sorted(expected)
    for name, value in expected.items():
        assert written[name].dtype == value.dtype, name
        assert mx.array_equal(written[name], value).item(), name


def _mlx_lm_greedy(path, family: str) -> list[int]:
    """mlx-lm's greedy tokens; PhiMoE's LongRoPE switched at original_max_position_embeddings
    and gpt-oss's YaRN range unrounded (`truncate: false`) as transformers does (mixchat's
    fix-ups of mlx-lm's definition, model/families.py AFTER_BUILD)."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from model.families import AFTER_BUILD

    model, tokenizer = mlx_lm.load(str(path))
    if family in AFTER_BUILD:
        AFTER_BUILD[family](model.model, json.loads((path / "config.json").read_text()))
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=TOKENS,
                                                     sampler=make_sampler(0.0))]  # fmt: skip


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2", "granitemoe", "phimoe"])
def test_quantized_family_is_mlx_lms_conversion(sources, tmp_path, family):
    import mlx_lm

    from quantize.cli import main

    out, ref = tmp_path / "q", tmp_path / "ref"
    assert main(["quantize", str(sources[family]), str(out), "--no-eval", "--quiet"]) == 0
    mlx_lm.convert(str(sources[family]), str(ref), quantize=True, q_bits=4, q_group_size=64)
    _assert_same_conversion(out, ref)
    _, tokens = _reply(Engine.load(str(out)))
    assert tokens == _mlx_lm_greedy(out, family)[: len(tokens)] and len(tokens) >= TOKENS - 1


def _as_mlx_lm_reads_float_gpt_oss(src, dst) -> None:
    """A copy of transformers' float gpt-oss directory with its experts as mlx-lm's sanitize
    reads them (and the MXFP4 blocks are laid out): `experts.gate_up_proj.weight` [E, out, in].
    mlx_lm.convert refuses transformers' own [E, in, out] `experts.gate_up_proj` (parameters
    not in the model), so this is its input for the same weights."""
    import shutil

    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    experts = ("experts.gate_up_proj", "experts.down_proj")
    mx.save_safetensors(str(dst / "model.safetensors"), {
        (k + ".weight" if k.endswith(experts) else k): (v.swapaxes(-1, -2) if k.endswith(experts) else v)
        for k, v in weights.items()}, metadata={"format": "pt"})  # fmt: skip


@pytest.mark.parametrize("form", ["gpt_oss", "gpt_oss_mxfp4"])
def test_quantized_gpt_oss_is_mlx_lms_conversion(sources, tmp_path, form):
    """gpt-oss float (as transformers saves it) and MXFP4 (as published): `mixchat quantize`
    writes what `mlx_lm.convert -q` writes (MXFP4: the experts' blocks and scales kept as they
    are, MXFP4 the config's default and every module quantized here at its own 4-bit affine,
    the router 8-bit; float: experts and their biases in 4-bit affine), and mixchat's greedy
    tokens on it equal mlx-lm's."""
    import mlx_lm

    from quantize.cli import main

    out, ref, src = tmp_path / "q", tmp_path / "ref", sources[form]
    assert main(["quantize", str(src), str(out), "--no-eval", "--quiet"]) == 0
    if form == "gpt_oss":
        _as_mlx_lm_reads_float_gpt_oss(src, tmp_path / "mlx_lm_input")
        src = tmp_path / "mlx_lm_input"
    mlx_lm.convert(str(src), str(ref), quantize=True, q_bits=4, q_group_size=64)
    _assert_same_conversion(out, ref)
    written = mx.load(str(out / "model.safetensors"))
    experts = written["model.layers.0.mlp.experts.gate_proj.scales"]
    assert experts.dtype == (mx.uint8 if form == "gpt_oss_mxfp4" else mx.float32)
    _, tokens = _reply(Engine.load(str(out)))
    assert tokens == _mlx_lm_greedy(out, "gpt_oss")[: len(tokens)] and len(tokens) >= TOKENS - 1


def test_expert_bits_on_published_mxfp4_experts_is_one_line(sources, tmp_path, capsys):
    """MXFP4 experts are kept as published: --expert-bits would be ignored, so it is refused."""
    from quantize.cli import main

    out = tmp_path / "q"
    args = ["quantize", str(sources["gpt_oss_mxfp4"]), str(out), "--no-eval", "--quiet"]
    assert main([*args, "--expert-bits", "8"]) != 0 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--expert-bits" in err[0] and "MXFP4 as published" in err[0], err


@pytest.mark.parametrize("arch", ["DBRX"])
def test_gguf_of_a_family_not_read_is_one_line(tmp_path, arch, capsys):
    """A llama.cpp architecture mixchat does not read (DBRX): loading or quantizing its GGUF is
    refused in one line naming it and what mixchat reads."""
    import gguf
    import numpy as np

    from model.errors import MixchatError
    from quantize.cli import main

    name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)]
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), name)
    writer.add_block_count(1)
    writer.add_expert_count(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MixchatError) as e:
        Engine.load(str(path))
    assert str(e.value).startswith(f"mixchat does not read {name} GGUF files")
    assert main(["quantize", str(path), str(tmp_path / "q"), "--no-eval", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err


@pytest.mark.parametrize("family", ["deepseek_v3", "phimoe"])
def test_memory_plan_advice_names_the_tool_that_converts_it(sources, family):
    """An unquantized family checkpoint cannot stream its experts: the advice names
    `mixchat quantize`, which converts these families exactly (model.config.QUANTIZE_TYPES)."""
    from model.memory_plan import memory_plan
    from model.weights import locate

    plan = memory_plan(locate(sources[family]), 4, 256)
    assert not plan.offloadable
    assert f"convert it with `mixchat quantize {sources[family]} DIR`" in plan.why_not


@pytest.mark.parametrize("family", ["gpt_oss", "gpt_oss_mxfp4"])
def test_published_gpt_oss_is_seen_as_moe_and_told_to_convert(sources, family):
    """gpt-oss publishes each layer's experts in one unstacked tensor (float or MXFP4): they are
    its experts (not resident weights of a dense model), and they stream only once converted,
    by `mixchat quantize` as for the other families."""
    from model.memory_plan import memory_plan
    from model.weights import locate

    plan = memory_plan(locate(sources[family]), 4, 256)
    assert not plan.offloadable and plan.moe_layers == 2 and plan.total_expert_bytes > 0
    assert "dense" not in plan.why_not
    assert f"convert it with `mixchat quantize {sources[family]} DIR`" in plan.why_not


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_compare_and_the_evaluation_after_quantize_run_the_family(sources, tmp_path, family):
    """`mixchat quantize` (with its evaluation) and `mixchat compare` on these families: the
    reference's perplexity is transformers' on the same tokens; a model against itself agrees
    (its routers too: DeepSeek's first, dense, layer is not counted; DeepSeek-V3's dropped
    groups masked as the engine masks them)."""

    from quantize.cli import main
    from quantize.compare import compare_models

    src = str(sources[family])
    text = "The quick brown fox jumps over the lazy dog. " * 3
    assert_compare_with_itself(src, text)
    out = tmp_path / "q"
    assert main(["quantize", src, str(out), "--quiet"]) == 0  # evaluated against the source
    quantized = compare_models(src, str(out), text, max_tokens=32)
    assert quantized.kl_divergence > 1e-4 and quantized.router_agreement < 1


def assert_statistics_are_the_engines(result, reference: str, candidate: str, ids: list[int]):
    """compare's `result` equals the statistics of the two models run whole by the engine (a
    small KL's float32 rounding: its 2%)."""
    for name, value in _engine_statistics(reference, candidate, ids).items():
        rel = 2e-2 if name == "kl_divergence" else 1e-3
        assert getattr(result, name) == pytest.approx(value, rel=rel), name


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
    """granitemoe and phimoe run the model's own ends around mlx-lm's layers (GraniteMoE's
    embedding multiplier and logits_scaling, PhiMoE's LayerNorm final norm and lm_head bias):
    the reference perplexity is transformers'; quantize's quality report runs; a 4-bit copy's
    numbers (perplexities, KL, top-1, router agreement) are the engine's whole-model ones."""

    from quantize.cli import main
    from quantize.compare import compare_models

    src = str(sources[family])
    _, ids = assert_compare_with_itself(src, COMPARE_TEXT)

    out = tmp_path / "q"
    assert main(["quantize", src, str(out), "--quiet"]) == 0  # evaluated against the source
    assert "quality report failed" not in capsys.readouterr().err
    quantized = compare_models(src, str(out), COMPARE_TEXT, max_tokens=32)
    assert np.isfinite(quantized.perplexity_candidate) and quantized.kl_divergence > 1e-4
    assert 0 < quantized.router_agreement < 1
    assert_statistics_are_the_engines(quantized, src, str(out), ids)


def test_compare_runs_gpt_oss_as_published_and_converted(sources, tmp_path):
    """gpt-oss (sliding layers masked to their window of 4, attention sinks, biased experts,
    YaRN): float and MXFP4 as published give transformers' perplexity; mlx_lm.convert's MXFP4
    directory holds the same weights (KL 0); its 4-bit affine one gives the engine's numbers."""
    import mlx_lm

    from quantize.compare import compare_models

    gptoss = {"float": sources["gpt_oss"], "mxfp4": sources["gpt_oss_mxfp4"],
              "reference": sources["gpt_oss_reference"]}  # fmt: skip
    for kind, extra in (("mlx_mxfp4", {}), ("f", dict(dequantize=True))):
        mlx_lm.convert(str(gptoss["mxfp4"]), str(tmp_path / kind), **extra)
    mlx_lm.convert(str(tmp_path / "f"), str(tmp_path / "4bit"), quantize=True, q_bits=4,
                   q_group_size=32)  # fmt: skip
    gptoss.update(mlx_mxfp4=tmp_path / "mlx_mxfp4", **{"4bit": tmp_path / "4bit"})
    for form, reference in (("float", "float"), ("mxfp4", "reference")):
        _, ids = assert_compare_with_itself(str(gptoss[form]), COMPARE_TEXT, gptoss[reference])
    assert len(ids) > 2 * 4  # past the sliding window
    converted = compare_models(str(gptoss["mxfp4"]), str(gptoss["mlx_mxfp4"]), COMPARE_TEXT, 32)
    assert converted.kl_divergence == pytest.approx(0, abs=1e-6)
    assert converted.top1_agreement == 1 and converted.router_agreement == 1
    quantized = compare_models(str(gptoss["float"]), str(gptoss["4bit"]), COMPARE_TEXT, 32)
    assert quantized.kl_divergence > 1e-4 and 0 < quantized.router_agreement < 1
    assert_statistics_are_the_engines(quantized, str(gptoss["float"]), str(gptoss["4bit"]), ids)
