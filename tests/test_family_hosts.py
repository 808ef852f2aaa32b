"""`--hosts` for the MoE families on mlx-lm's definitions: two ranks on loopback (MLX's ring
backend), each holding half of every layer's experts, give the greedy tokens of one process."""

from __future__ import annotations

import json

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


def test_the_layer_split_is_refused_in_one_line(qwen3_moe):
    with pytest.raises(MixchatError, match="by experts only"):
        weights.plan_memory(weights.locate(qwen3_moe), split=_Pipeline())
