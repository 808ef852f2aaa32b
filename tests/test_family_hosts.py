"""`--hosts` for the MoE families on mlx-lm's definitions: two ranks on loopback (MLX's ring
backend), each holding half of every layer's experts, give the greedy tokens of one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model import Engine, GenerationSettings, weights
from model.errors import MixchatError
from tests.test_distributed import MIXCHAT, finish, start_ranks
from tests.test_families import build_family

pytestmark = pytest.mark.xdist_group("ranks")  # ranks on loopback ports: one worker runs them all

# Over 32 tokens: the prompt takes mlx-lm's sorted expert path, decoding the other one.
PROMPT = ("Tell me about mixtures of experts, at length: how a router picks two experts per "
          "token, why only a quarter of the weights work for each token")  # fmt: skip
TOKENS = 12


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family_hosts") / "qwen3_moe", "qwen3_moe")


def test_two_ranks_give_the_greedy_tokens_of_one_process(qwen3_moe, tmp_path):
    engine = Engine.load(str(qwen3_moe))
    messages = [{"role": "user", "content": PROMPT}]
    assert len(engine.prompt_ids(messages)) * 2 >= 64  # the prompt's k slots: sorted path
    settings = GenerationSettings(max_tokens=TOKENS, temperature=0.0)
    expected = "".join(c.text for c in engine.stream(messages, settings))
    probe = ("import json, sys; from model import distributed, weights; from pathlib import Path;"
             "split = distributed.rank_split();"
             "m = weights.build_model(weights.locate(Path(sys.argv[1])), split=split);"
             "print(json.dumps(sorted({v.shape[0] for k, v in __import__('mlx.utils').utils"
             ".tree_flatten(m.parameters()) if '.switch_mlp.' in k})))")  # fmt: skip
    args = [MIXCHAT, "ask", "-m", str(qwen3_moe), "--json", "--temp", "0", "--max-tokens",
            str(TOKENS), PROMPT]  # fmt: skip
    results = finish(start_ranks(args, tmp_path))
    for code, _, err in results:
        assert code == 0, err
    (_, out, _), (_, rest, _) = results
    assert rest.strip() == ""  # rank 0 alone prints
    reply = json.loads(out)
    assert reply["generation_tokens"] == TOKENS and reply["text"] == expected
    # each rank holds 4 of the 8 experts of every layer
    import sys

    shares = finish(start_ranks([sys.executable, "-c", probe, str(qwen3_moe)], tmp_path))
    assert [(code, json.loads(out)) for code, out, _ in shares] == [(0, [4]), (0, [4])]


class _Pipeline:
    class world:
        mode = "pipeline"


@pytest.fixture(scope="module")
def other_layouts(tmp_path_factory):
    """PhiMoE (per-expert tensors under Mixtral's w1/w2/w3 names) and GraniteMoE (experts
    stacked as input_linear/output_linear), as tests/test_family_more.py builds them."""
    from tests.test_family_more import COMMON, FAMILIES, build_checkpoint, published

    root = tmp_path_factory.mktemp("family_hosts_more")
    return {f: build_checkpoint(root / f, FAMILIES[f][0], {**COMMON, **FAMILIES[f][1]},
                                fix=published) for f in ("phimoe", "granitemoe")}  # fmt: skip


@pytest.mark.parametrize("family", ["phimoe", "granitemoe"])
def test_other_checkpoint_layouts_split_by_experts(other_layouts, family, tmp_path):
    path = other_layouts[family]
    settings = GenerationSettings(max_tokens=6, temperature=0.0)
    messages = [{"role": "user", "content": PROMPT}]
    expected = "".join(c.text for c in Engine.load(str(path)).stream(messages, settings))
    args = [MIXCHAT, "ask", "-m", str(path), "--json", "--temp", "0", "--max-tokens", "6", PROMPT]
    (code, out, err), (code1, _, err1) = finish(start_ranks(args, tmp_path))
    assert code == 0 and code1 == 0, err + err1
    assert json.loads(out)["text"] == expected


def greedy_tokens(path: str, split=None, count: int = 6) -> dict:
    """The model at `path` (this rank's share under `split`) greedily continuing PROMPT's
    tokens, the whole sequence run again for each token, and how many experts of each layer
    it holds."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from model.tokenizer import load_tokenizer

    model = weights.build_model(weights.locate(Path(path)), split=split)
    ids = load_tokenizer(Path(path)).encode(PROMPT)
    for _ in range(count):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    held = {v.shape[0] for k, v in tree_flatten(model.parameters()) if ".experts." in k}
    return {"tokens": ids[-count:], "held": sorted(held)}


@pytest.fixture(scope="module")
def gpt_oss_layouts(tmp_path_factory):
    """gpt-oss float (as transformers saves it: gate_up_proj fused, [E, in, 2*out], biased),
    MXFP4 as published (`*_blocks`/`*_scales`) and `mixchat quantize`d (4-bit affine,
    = mlx_lm.convert's)."""
    from quantize.cli import main
    from tests.test_family_gptoss import build_gptoss

    root = tmp_path_factory.mktemp("family_hosts_gptoss")
    built = build_gptoss(root)
    quantized = root / "affine"
    assert main(["quantize", str(built["float"]), str(quantized), "--no-eval", "--quiet"]) == 0
    return [str(built["float"]), str(built["mxfp4"]), str(quantized)]


def test_gpt_oss_splits_by_experts_in_every_layout(gpt_oss_layouts, tmp_path):
    """Two ranks, each holding 4 of the 8 experts of every layer (fused gate_up weights and
    their biases, MXFP4 blocks and scales, or 4-bit weights, read by byte range), continue the
    prompt with one process's greedy tokens, in each layout (one run of the two ranks)."""
    import sys

    probe = ("import json, sys; from model import distributed;"
             "from tests.test_family_hosts import greedy_tokens;"
             "out = [greedy_tokens(p, distributed.rank_split()) for p in sys.argv[1:]];"
             "print(json.dumps(out))")  # fmt: skip
    ranks = finish(start_ranks([sys.executable, "-c", probe, *gpt_oss_layouts], tmp_path))
    for code, _, err in ranks:
        assert code == 0, err
    for _, out, _ in ranks:
        for path, got in zip(gpt_oss_layouts, json.loads(out), strict=True):
            alone = greedy_tokens(path)
            assert alone["held"] == [8] and got == {"tokens": alone["tokens"], "held": [4]}, path


def test_the_layer_split_is_refused_in_one_line(qwen3_moe):
    with pytest.raises(MixchatError, match="by experts only"):
        weights.plan_memory(weights.locate(qwen3_moe), split=_Pipeline())
