"""Two ranks on loopback (MLX's ring backend, random ports): the same greedy tokens as one
process, half of the experts read and held per rank, rank 0 leading a chat, a killed rank
ending the run in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.cli import main
from model import Engine, GenerationSettings, distributed, weights
from model.memory_plan import memory_plan

pytestmark = pytest.mark.xdist_group("ranks")  # ranks on loopback ports: one worker runs them all

BIN = Path(sys.executable).parent
MIXCHAT = str(BIN / "mixchat")
# Over 32 tokens: the prompt takes the sorted (prefill) expert path, decoding the other one.
PROMPT = (
    "Tell me about mixtures of experts, at length: how a router picks two experts per "
    "token, why only a quarter of the weights work for each token, and what that means."
)
TIMEOUT = 90  # every subprocess; a hang fails the test instead of blocking the suite


def quantized(src: Path, dst: Path) -> Path:
    """`src` in MLX's 4-bit layout (experts stacked per layer), by the project's quantizer."""
    from quantize.convert import Settings, convert
    from quantize.sources import open_source

    convert(open_source(str(src)), dst, Settings(bits=4, group_size=32), quiet=True)
    if not (dst / "tokenizer.model").exists():
        shutil.copy(src / "tokenizer.model", dst / "tokenizer.model")
    return dst


@pytest.fixture(scope="module")
def tiny_q4(tiny_mixtral, tmp_path_factory):
    """tiny_mixtral (2 layers, 4 experts, top-2) in MLX's 4-bit layout."""
    return quantized(tiny_mixtral, tmp_path_factory.mktemp("dist") / "q4")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A Mixtral whose experts outweigh its embeddings (so that reading half shows), in the
    Hugging Face layout (one tensor per expert) and in MLX's 4-bit layout."""
    from tests.checkpoints import build_hf_checkpoint

    root = tmp_path_factory.mktemp("wide")
    hf = build_hf_checkpoint(root / "hf", "mixtral", intermediate_size=2048, num_experts=4)
    return [quantized(hf, root / "q4"), hf]


def free_ports(count: int) -> int:
    """A random port P with P .. P+count-1 free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            socks = [socket.create_server(("127.0.0.1", base + i)) for i in range(count)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base
    raise RuntimeError("no free ports")


def hostfile(tmp_path: Path) -> Path:
    base = free_ports(2)
    path = tmp_path / f"ring-{base}.json"
    path.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    return path


def start_ranks(args: list[str], tmp_path: Path, env: dict | None = None) -> list:
    """Both ranks of `args` (a command line) started by hand, as MLX_RANK/MLX_HOSTFILE allow."""
    hosts = hostfile(tmp_path)
    procs = []
    for rank in range(2):
        rank_env = os.environ | (env or {}) | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)}
        procs.append(subprocess.Popen(args, env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))  # fmt: skip
    return procs


def finish(procs: list) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process; stragglers are killed after TIMEOUT."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append((p.returncode, out.decode(), err.decode()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def prompt_ids(model: Path, prompt: str) -> list[int]:
    from model.tokenizer import load_tokenizer

    return load_tokenizer(model).encode_chat([{"role": "user", "content": prompt}])


def one_process(model: Path, messages, settings) -> str:
    engine = Engine.load(str(model))
    return "".join(c.text for c in engine.stream(messages, settings))


def test_two_ranks_under_mlx_launch_give_the_tokens_of_one_process(tiny_q4):
    greedy = GenerationSettings(max_tokens=24, temperature=0.0)
    expected = one_process(tiny_q4, [{"role": "user", "content": PROMPT}], greedy)
    assert len(prompt_ids(tiny_q4, PROMPT)) * 2 >= 64
    args = ["ask", "-m", str(tiny_q4), "--json", "--max-tokens", "24", PROMPT]
    launch = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "-p", str(free_ports(2)),
              "--python", sys.executable, MIXCHAT, *args]  # fmt: skip
    result = subprocess.run(launch, capture_output=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().strip().splitlines()
    assert len(lines) == 1  # rank 0 alone prints
    reply = json.loads(lines[0])
    assert reply["generation_tokens"] == 24
    assert reply["text"] == expected


PROBE = textwrap.dedent("""
    import json, sys
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from app.settings import read_settings
    from model import distributed, weights

    def read_bytes():  # bytes read by read(2)/pread(2) so far (Linux)
        for line in open("/proc/self/io"):
            if line.startswith("rchar:"):
                return int(line.split()[1])

    split = distributed.rank_split(read_settings().parallel)  # None: one process
    out = []
    for path in sys.argv[1:]:
        checkpoint = weights.locate(__import__("pathlib").Path(path))
        before = read_bytes()
        model = weights.build_model(checkpoint, split=split)
        read = read_bytes() - before
        params = dict(tree_flatten(model.parameters()))
        experts = sum(v.nbytes for k, v in params.items() if ".switch_mlp." in k)
        shapes = {k: v.shape[0] for k, v in params.items() if ".switch_mlp." in k}
        other = sum(v.nbytes for k, v in params.items() if ".switch_mlp." not in k)
        out.append({"rank": distributed.world().rank, "expert_bytes": experts, "read": read,
                    "other_bytes": other, "experts_per_tensor": sorted(set(shapes.values())),
                    "params": sorted(params)})
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads with /proc/self/io")
def test_each_rank_reads_and_holds_half_of_the_experts(wide, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    models = [str(m) for m in wide]  # stacked (MLX) and per-expert (HF) layouts
    command = [sys.executable, str(script), *models]
    ranks = start_ranks(command, tmp_path)
    single = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = finish([single, *ranks])
    for code, _, err in results:
        assert code == 0, err
    whole, *ranks = [json.loads(out) for _, out, _ in results]
    for i, path in enumerate(models):
        on_disk = memory_plan(weights.locate(Path(path)), 4).total_expert_disk_bytes
        assert whole[i]["experts_per_tensor"] == [4]
        assert whole[i]["read"] >= on_disk
        for rank, probe in enumerate(r[i] for r in ranks):
            assert probe["rank"] == rank
            assert probe["experts_per_tensor"] == [2]  # 4 experts per layer, 2 per rank
            assert probe["expert_bytes"] * 2 == whole[i]["expert_bytes"]
            assert probe["other_bytes"] == whole[i]["other_bytes"]  # replicated
            # Bytes read from disk: half of the experts fewer than one process reads.
            saved = whole[i]["read"] - probe["read"]
            assert abs(saved - on_disk // 2) < on_disk // 10, (saved, on_disk)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads with /proc/self/io")
def test_each_pipeline_rank_reads_and_holds_only_its_layers(wide, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    command = [sys.executable, str(script), str(wide[0])]
    results = finish(start_ranks(command, tmp_path, {"MIXCHAT_PARALLEL": "pipeline"}))
    for code, _, err in results:
        assert code == 0, err
    tensors = weights.locate(wide[0]).tensors
    assert not weights.locate(wide[0]).args.tie_word_embeddings
    # 2 layers: rank 0 embeds and runs layer 0, rank 1 runs layer 1 (its local layer 0) and
    # the LM head; both hold the final norm (one vector).
    held = [("model.embed_tokens.", "model.layers.0.", "model.norm."),
            ("model.layers.1.", "lm_head.", "model.norm.")]  # fmt: skip
    total = sum(spec.nbytes for spec in tensors.values())
    for rank, (_, out, _) in enumerate(results):
        probe = json.loads(out)[0]
        assert probe["rank"] == rank
        mine = [name for name in tensors if name.startswith(held[rank])]
        assert probe["params"] == sorted(n.replace("layers.1.", "layers.0.") for n in mine)
        assert probe["experts_per_tensor"] == [4]  # every expert of its layer
        on_disk = sum(tensors[name].nbytes for name in mine)
        assert on_disk < 0.7 * total  # so that reading everything would show
        assert abs(probe["read"] - on_disk) < total // 20, (probe["read"], on_disk, total)


LEADER = textwrap.dedent("""
    import json, sys
    from concurrent.futures import ThreadPoolExecutor
    from app.settings import read_settings
    from model import Engine, GenerationSettings, distributed

    def turns():
        greedy = GenerationSettings(max_tokens=12, temperature=0.0)
        first = [{"role": "user", "content": "Bonjour, qui es-tu ?"}]
        replies = ["".join(c.text for c in engine.stream(first, greedy))]
        second = first + [{"role": "assistant", "content": replies[0]},
                          {"role": "user", "content": "Et ensuite ?"}]
        replies.append("".join(c.text for c in engine.stream(second, greedy)))  # cache reused
        stream = engine.stream(first, GenerationSettings(max_tokens=200, temperature=0.0))
        next(stream)
        engine.cancel()
        finish = [c.stats.finish_reason for c in stream if c.stats][0]
        engine.reset()
        sampled = GenerationSettings(max_tokens=12, temperature=0.9, seed=7)
        replies.append("".join(c.text for c in engine.stream(first, sampled)))
        return {"replies": replies, "cancelled": finish, "mode": distributed.world().mode,
                "layers": len(engine.model.layers), "stage": engine.model.stage is not None}

    # As the chat app does: the ranks join first, then the model loads in one thread and
    # replies stream in another.
    split = distributed.rank_split(read_settings().parallel)
    engine = ThreadPoolExecutor(1).submit(Engine.load, sys.argv[1], split=split).result()
    assert distributed.world().size == 2 and engine.peers is not None
    print(json.dumps(ThreadPoolExecutor(1).submit(turns).result()))
""")


@pytest.mark.parametrize("mode", ["expert", "pipeline"])
def test_rank_0_leads_a_chat_the_other_rank_follows(tiny_mixtral, tmp_path, mode):
    script = tmp_path / "leader.py"
    script.write_text(LEADER)
    leader = [sys.executable, str(script), str(tiny_mixtral)]
    follower = [MIXCHAT, "chat", "-m", str(tiny_mixtral)]
    hosts = hostfile(tmp_path)
    procs = []
    for rank, args in enumerate((leader, follower)):
        env = os.environ | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts),
                            "MIXCHAT_PARALLEL": mode}  # fmt: skip
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))  # fmt: skip
    (code0, out0, err0), (code1, out1, err1) = finish(procs)
    assert code0 == 0, err0
    assert code1 == 0 and out1 == "", err1  # the follower exits when rank 0 is done
    got = json.loads(out0)
    assert got["cancelled"] == "cancelled"
    pipeline = mode == "pipeline"  # rank 0 holds one of the 2 layers, or both
    assert (got["mode"], got["stage"], got["layers"]) == (mode, pipeline, 1 if pipeline else 2)
    engine = Engine.load(str(tiny_mixtral))
    greedy = GenerationSettings(max_tokens=12, temperature=0.0)
    first = [{"role": "user", "content": "Bonjour, qui es-tu ?"}]
    expected = ["".join(c.text for c in engine.stream(first, greedy))]
    second = first + [{"role": "assistant", "content": expected[0]},
                      {"role": "user", "content": "Et ensuite ?"}]  # fmt: skip
    expected.append("".join(c.text for c in engine.stream(second, greedy)))
    engine.reset()
    sampled = GenerationSettings(max_tokens=12, temperature=0.9, seed=7)
    expected.append("".join(c.text for c in engine.stream(first, sampled)))
    assert got["replies"] == expected


def test_a_rank_killed_mid_reply_ends_rank_0_with_one_line(tiny_q4, tmp_path):
    args = [MIXCHAT, "ask", "-m", str(tiny_q4), "--max-tokens", "3000", PROMPT]
    procs = start_ranks(args, tmp_path)
    try:
        assert procs[0].stdout is not None
        first = procs[0].stdout.read(8)  # rank 0 is replying
        assert first
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        code = procs[0].wait(timeout=30)
        elapsed = time.monotonic() - start
        err = procs[0].stderr.read().decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert code == 1
    assert elapsed < 30
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mixchat: error: rank 1 stopped responding")


def test_a_follower_that_cannot_load_is_reported_by_rank_0(tiny_q4, tmp_path):
    hosts = hostfile(tmp_path)
    procs = []
    for rank, model in enumerate((tiny_q4, tmp_path / "missing")):
        env = os.environ | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)}
        procs.append(subprocess.Popen([MIXCHAT, "ask", "-m", str(model), "hi"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    (code0, _, err0), (code1, _, _) = finish(procs)
    assert code0 == 1 and code1 == 1
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixchat: error: rank 1: no model at"), lines


@pytest.mark.parametrize("other", [{"MIXCHAT_PARALLEL": "pipeline"}, {"--dtype": "float16"}])
def test_ranks_started_with_other_settings_refuse_to_run(tiny_q4, tmp_path, other):
    """A rank computing in another dtype, or splitting the model another way, would add up
    other numbers: a one-line error."""
    hosts = hostfile(tmp_path)
    procs = []
    flags = [item for k, v in other.items() if k.startswith("--") for item in (k, v)]
    for rank, extra in enumerate(([], flags)):
        env = os.environ | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)}
        env |= {k: v for k, v in other.items() if rank == 1 and not k.startswith("--")}
        args = [MIXCHAT, "ask", "-m", str(tiny_q4), *extra, "hi"]
        procs.append(
            subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    (code0, out0, err0), (code1, _, _) = finish(procs)
    assert code0 == 1 and code1 == 1 and out0 == ""
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and "rank 1 loaded another model or other settings" in lines[0], lines


def test_info_hosts_predicts_memory_per_rank_and_traffic(tiny_q4, tmp_path, capsys):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"hosts": [{"ssh": "mac-a", "ips": ["10.0.0.1"]},
                                           {"ssh": "mac-b", "ips": ["10.0.0.2"]}]}))  # fmt: skip
    assert main(["info", str(tiny_q4), "--hosts", str(hosts), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["hosts"]
    checkpoint = weights.locate(tiny_q4)
    args, tensors = checkpoint.args, checkpoint.tensors
    experts = sum(s.nbytes for k, s in tensors.items() if ".switch_mlp." in k)
    plan = memory_plan(checkpoint, 4)
    assert got["hosts"] == ["mac-a", "mac-b"] and got["default"] == "expert"
    expert, pipeline = got["modes"]["expert"], got["modes"]["pipeline"]
    assert expert["experts_per_rank"] == 2
    assert expert["expert_bytes"] == experts // 2  # 4-bit packed: stored as loaded
    assert expert["rank_bytes"] == (
        plan.resident_bytes + experts // 2 + plan.kv_bytes + plan.full_activation_bytes
    )
    # Per token: one float32 [hidden] all_sum per MoE layer (a 2-rank ring sends it once),
    # and one 4-byte all_sum agreeing on stopping.
    assert expert["sent_bytes_per_token"] == args.num_hidden_layers * args.hidden_size * 4 + 4
    assert expert["exchanges_per_token"] == args.num_hidden_layers + 1
    assert expert["experts_read_per_layer"] == pytest.approx((2 * 2 + 4 * 1) / 6)  # top-2 of 4
    # Pipeline, 2 layers: the larger rank holds one layer (all its experts) and the embeddings
    # or the LM head, the final norm, and half of the KV cache; per token one float32 [hidden]
    # hop, the 4-byte token and the 4-byte stop flag.
    def held(prefixes):
        def size(name):  # the compute dtype (float32) for floating tensors
            spec = tensors[name]
            return spec.nbytes * (2 if spec.dtype in ("F16", "BF16") else 1)

        names = [n for n in tensors if n.startswith(prefixes) and ".switch_mlp." not in n]
        return sum(size(n) for n in names)

    resident = max(held(("model.embed_tokens.", "model.layers.0.", "model.norm.")),
                   held(("lm_head.", "model.layers.1.", "model.norm.")))  # fmt: skip
    assert pipeline["resident_bytes"] == resident
    assert pipeline["expert_bytes"] == experts // 2  # one of the two layers
    assert pipeline["reserve_bytes"] == plan.kv_bytes // 2 + plan.full_activation_bytes
    assert pipeline["sent_bytes_per_token"] == args.hidden_size * 4 + 4 + 4
    assert pipeline["exchanges_per_token"] == 3 and pipeline["experts_read_per_layer"] == 2
    assert main(["info", str(tiny_q4), "--hosts", str(hosts)]) == 0
    text = capsys.readouterr().out
    assert "2 of 4 experts per layer" in text and "layers 0-0 of 2" in text
    assert "10 Gb/s Ethernet" in text


def test_bad_hostfile_and_dense_model_are_one_line_errors(
    tiny_q4, tiny_mistral_windowed, tmp_path, capsys
):
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text('{"hosts": 3}')
    good.write_text('[["10.0.0.1:5000"], ["10.0.0.2:5000"]]')
    for model, hosts, message in ((tiny_q4, bad, "expected a list of hosts"),
                                  (tiny_q4, tmp_path / "none.json", "cannot read hostfile")):  # fmt: skip
        assert main(["info", str(model), "--hosts", str(hosts)]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("mixchat: error:") and message in lines[0]
    # A dense model splits by layers only.
    assert main(["info", str(tiny_mistral_windowed), "--hosts", str(good), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["hosts"]["modes"]) == ["pipeline"]
    dense = weights.locate(tiny_mistral_windowed)
    model = weights.Model(dense.args)
    with pytest.raises(distributed.DistributedError, match="dense model.*MIXCHAT_PARALLEL=pipe"):
        distributed.take_share(dense, {}, model, distributed.World(0, 2))


def test_expert_and_layer_ranges_cover_every_one_once():
    for experts, ranks in ((8, 2), (8, 3), (4, 4), (128, 5)):
        ranges = [distributed.expert_range(experts, r, ranks) for r in range(ranks)]
        assert ranges[0][0] == 0 and ranges[-1][1] == experts
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(hi - lo for lo, hi in ranges) - min(hi - lo for lo, hi in ranges) <= 1
    for layers, ranks in ((32, 2), (56, 3), (2, 2), (7, 4)):
        blocks = [distributed.layer_range(layers, r, ranks) for r in range(ranks)]
        assert blocks[0][0] == 0 and blocks[-1][1] == layers
        assert all(a[1] == b[0] and a[1] > a[0] for a, b in zip(blocks, blocks[1:]))
    # Top-2 of 8 on 2 ranks: 12 of the 28 pairs sit on one rank (it applies 2), 16 are split.
    assert distributed.critical_experts(8, 2, 2) == pytest.approx((12 * 2 + 16 * 1) / 28)
    assert distributed.critical_experts(8, 2, 1) == 2


def test_leader_fixes_a_seed_so_every_rank_samples_alike():
    sent = []

    class Control:
        def send(self, message):
            sent.append(message)

    leader = distributed.Leader(Control())  # type: ignore[arg-type]
    settings = leader.start_stream([{"role": "user", "content": "hi"}],
                                   GenerationSettings(temperature=0.8))  # fmt: skip
    assert settings.seed is not None
    assert sent == [{"op": "stream", "messages": [{"role": "user", "content": "hi"}],
                     "settings": {"max_tokens": 512, "temperature": 0.8, "top_p": 1.0,
                                  "min_p": 0.0, "seed": settings.seed}}]  # fmt: skip
    kept = leader.start_stream([], GenerationSettings(seed=3))
    assert kept.seed == 3 and sent[-1]["settings"]["seed"] == 3


def test_loading_and_generation_never_import_the_distributed_package():
    """The app joins the ranks and passes the split down (as mlx-lm's sharded_load is given a
    group): model/generate.py, loader.py, weights.py and info.py import nothing of
    model/distributed/, even inside functions."""
    import ast

    root = Path(__file__).resolve().parent.parent / "model"
    for name in ("generate.py", "loader.py", "weights.py", "info.py", "load_options.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("distributed" in n for n in names), (name, ast.dump(node))
