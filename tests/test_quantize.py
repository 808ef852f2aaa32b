"""`mixchat quantize`: format, loadability in mixchat and mlx-lm, Mistral sources, resume,
broken sources, --force, and the quality report against a direct numpy computation."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import quantize.convert as qc
from quantize.cli import main
from quantize.report import eval_text
from tests.checkpoints import build_hf_checkpoint, reference_logits

IDS = [1, 22557, 1526, 28725, 6478, 460, 368, 28804, 4838, 10949, 460, 15851, 28723]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def hf_src(tiny_mixtral_bf16_shards) -> Path:
    """Tiny bf16 Mixtral, HF layout in 2 MB shards; intermediate 128 so every matrix quantizes
    (the session's, shared with test_compare.py)."""
    return tiny_mixtral_bf16_shards


def quantize_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["quantize", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def tensors_of(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert mx.array_equal(ta[name], tb[name]).item(), name


def mixchat_logits(path: Path, ids: list[int]) -> np.ndarray:
    from model import load

    model, _ = load(path)
    return np.array(model(mx.array([ids])).astype(mx.float32))


def mlx_lm_logits(path: Path, ids: list[int]) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    model.set_dtype(mx.float32)  # MLX's CPU gather_mm runs in float32 only
    return np.array(model(mx.array([ids])).astype(mx.float32))


def assert_close_to_source(quantized: np.ndarray, source: np.ndarray) -> None:
    """8-bit logits track the source's (these random models amplify weight error, so no atol)."""
    assert quantized.shape == source.shape
    assert np.corrcoef(quantized.ravel(), source.ravel())[0, 1] > 0.995


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mixchat: error: ")
    return lines[0]


def to_mistral_format(hf: Path, out: Path, layout: str = "feed_forward", shards: int = 1) -> Path:
    """Mistral's own layout from an HF checkpoint: renamed tensors, Q/K back in interleaved-RoPE
    order (the inverse of HF's convert_mistral_weights_to_hf permutation), params.json.
    layout: "feed_forward" / "block_sparse_moe" (per-expert modules) or "stacked" (the first
    Mixtral release: experts concatenated along rows, w2 transposed)."""
    cfg = json.loads((hf / "config.json").read_text())
    w = tensors_of(hf)
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E = cfg.get("num_local_experts", 0) if cfg["model_type"] == "mixtral" else 0

    def unpermute(x: mx.array, heads: int) -> mx.array:
        rows = x.shape[0]
        return x.reshape(heads, 2, rows // heads // 2, H).swapaxes(1, 2).reshape(rows, H)

    m = {
        "tok_embeddings.weight": w["model.embed_tokens.weight"],
        "norm.weight": w["model.norm.weight"],
        "output.weight": w["lm_head.weight"],
    }
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"model.layers.{i}", f"layers.{i}"
        m[f"{q}.attention_norm.weight"] = w[f"{p}.input_layernorm.weight"]
        m[f"{q}.ffn_norm.weight"] = w[f"{p}.post_attention_layernorm.weight"]
        m[f"{q}.attention.wq.weight"] = unpermute(w[f"{p}.self_attn.q_proj.weight"], nh)
        m[f"{q}.attention.wk.weight"] = unpermute(w[f"{p}.self_attn.k_proj.weight"], nkv)
        m[f"{q}.attention.wv.weight"] = w[f"{p}.self_attn.v_proj.weight"]
        m[f"{q}.attention.wo.weight"] = w[f"{p}.self_attn.o_proj.weight"]
        if E:
            experts = [f"{p}.block_sparse_moe.experts.{e}" for e in range(E)]
            if layout == "stacked":
                m[f"{q}.block_sparse_moe.gate.weight"] = w[f"{p}.block_sparse_moe.gate.weight"]
                for n in ("w1", "w3"):
                    m[f"{q}.block_sparse_moe.{n}"] = mx.concatenate(
                        [w[f"{x}.{n}.weight"] for x in experts]
                    )
                m[f"{q}.block_sparse_moe.w2"] = mx.concatenate(
                    [w[f"{x}.w2.weight"].T for x in experts]
                )
            else:
                m[f"{q}.{layout}.gate.weight"] = w[f"{p}.block_sparse_moe.gate.weight"]
                for e, x in enumerate(experts):
                    for n in ("w1", "w2", "w3"):
                        m[f"{q}.{layout}.experts.{e}.{n}.weight"] = w[f"{x}.{n}.weight"]
        else:
            for n, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                m[f"{q}.feed_forward.{n}.weight"] = w[f"{p}.mlp.{proj}.weight"]
    out.mkdir(parents=True)
    names = sorted(m)
    for s in range(shards):
        part = {k: mx.contiguous(m[k]) for k in names[s::shards]}
        name = (
            "consolidated.safetensors"
            if shards == 1
            else f"consolidated-{s + 1:05d}-of-{shards:05d}.safetensors"
        )
        mx.save_safetensors(str(out / name), part)
    params = {
        "dim": H,
        "n_layers": cfg["num_hidden_layers"],
        "head_dim": H // nh,
        "hidden_dim": cfg["intermediate_size"],
        "n_heads": nh,
        "n_kv_heads": nkv,
        "norm_eps": cfg["rms_norm_eps"],
        "vocab_size": cfg["vocab_size"],
        "rope_theta": cfg["rope_parameters"]["rope_theta"],
    }
    if E:
        params["moe"] = {"num_experts": E, "num_experts_per_tok": cfg["num_experts_per_tok"]}
    (out / "params.json").write_text(json.dumps(params))
    shutil.copy(hf / "tokenizer.model", out / "tokenizer.model.v1")
    return out


# ----------------------------------------------------------------------------- format


def test_hf_round_trip_loads_in_mixchat_and_mlx_lm(hf_src, tmp_path, capsys):
    dst = tmp_path / "q8"
    code, out, err = quantize_cli(
        capsys, hf_src, dst, "--bits", "8", "--no-eval", "--max-shard-size", "1MB"
    )
    assert code == 0, err
    assert "Wrote" in out and "bits/weight" in out
    assert "Source:" in err and "━" not in err  # stderr is not a TTY here: no progress bar
    assert not dst.with_name("q8.partial").exists()

    config = json.loads((dst / "config.json").read_text())
    q = config["quantization"]
    assert (q["group_size"], q["bits"], q["mode"]) == (64, 8, "affine")
    assert q["model.layers.0.block_sparse_moe.gate"] is False  # router kept at source precision
    assert config["quantization_config"] == q
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in dst.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    weights = tensors_of(dst)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in weights.values())
    from safetensors import safe_open

    for shard in shards:  # shards respect the limit unless one module alone exceeds it
        with safe_open(dst / shard, "pt") as f:  # the reference reader validates the layout
            assert f.metadata() == {"format": "mlx"} and len(f.keys()) > 0
        part = mx.load(str(dst / shard))
        modules = {k.rsplit(".", 1)[0] for k in part}
        assert len(modules) == 1 or sum(a.nbytes for a in part.values()) <= 1_000_000
    experts = weights["model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight"]
    assert experts.shape == (4, 64, 128 * 8 // 32) and experts.dtype == mx.uint32
    assert (
        weights["model.layers.1.block_sparse_moe.switch_mlp.down_proj.scales"].dtype == mx.bfloat16
    )
    assert weights["model.layers.0.block_sparse_moe.gate.weight"].dtype == mx.bfloat16
    assert not any(".experts." in k for k in weights)
    assert (dst / "tokenizer.model").read_bytes() == (hf_src / "tokenizer.model").read_bytes()

    import mlx_lm

    model, tokenizer = mlx_lm.load(str(dst))  # the full mlx-lm load, tokenizer included
    assert tokenizer.encode("Hello world")[-2:] == [22557, 1526]
    model.set_dtype(mx.float32)
    ours = mixchat_logits(dst, IDS)
    theirs = np.array(model(mx.array([IDS])))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert_close_to_source(ours, reference_logits(hf_src, IDS))


def test_same_tensors_as_mlx_lm_convert(hf_src, tmp_path, capsys):
    """With mlx_lm.convert's choices (router quantized too) the output is bit-identical."""
    from mlx_lm import convert

    convert(str(hf_src), str(tmp_path / "mlx_lm"), quantize=True)
    capsys.readouterr()
    code, _, err = quantize_cli(
        capsys, hf_src, tmp_path / "ours", "--router-bits", "4", "--no-eval", "--quiet"
    )
    assert code == 0 and err == ""
    assert_same_tensors(tmp_path / "mlx_lm", tmp_path / "ours")


def test_mixed_recipe(hf_src, tmp_path, capsys):
    dst = tmp_path / "mixed"
    argv = [
        "--bits",
        "4",
        "--expert-bits",
        "3",
        "--router-bits",
        "8",
        "--embed-bits",
        "6",
        "--no-eval",
    ]
    code, _, err = quantize_cli(capsys, hf_src, dst, *argv)
    assert code == 0, err
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["bits"] == 4
    assert q["model.layers.0.block_sparse_moe.gate"] == {
        "group_size": 64,
        "bits": 8,
        "mode": "affine",
    }
    assert q["model.layers.1.block_sparse_moe.switch_mlp.up_proj"]["bits"] == 3
    assert q["model.embed_tokens"]["bits"] == 6 and q["lm_head"]["bits"] == 6
    assert "model.layers.0.self_attn.q_proj" not in q  # default bits: no override
    w = tensors_of(dst)
    assert w["model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight"].shape == (
        4,
        128,
        64 * 3 // 32,
    )
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64 * 4 // 32)
    assert w["model.embed_tokens.weight"].shape == (32000, 64 * 6 // 32)
    np.testing.assert_allclose(
        mixchat_logits(dst, IDS), mlx_lm_logits(dst, IDS), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("layout,shards", [("feed_forward", 2), ("stacked", 1)])
def test_mistral_format_gives_the_same_model(hf_src, tmp_path, capsys, layout, shards):
    """Mistral's consolidated layout (renamed, Q/K un-permuted) quantizes to exactly what the HF
    layout gives: the converter re-applies HF's rotate-half permutation."""
    src = to_mistral_format(hf_src, tmp_path / "mistral", layout, shards)
    code, _, err = quantize_cli(capsys, src, tmp_path / "from_mistral", "--no-eval")
    assert code == 0, err
    assert "Mistral format" in err
    code, _, err = quantize_cli(capsys, hf_src, tmp_path / "from_hf", "--no-eval", "--quiet")
    assert code == 0, err
    assert_same_tensors(tmp_path / "from_mistral", tmp_path / "from_hf")
    config = json.loads((tmp_path / "from_mistral" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert (tmp_path / "from_mistral" / "tokenizer.model").is_file()
    np.testing.assert_allclose(
        mlx_lm_logits(tmp_path / "from_mistral", IDS),
        mixchat_logits(tmp_path / "from_hf", IDS),
        atol=1e-4,
    )


def test_dense_mistral(tmp_path, capsys):
    src = build_hf_checkpoint(tmp_path / "dense", "mistral", dtype="float16", intermediate_size=128)
    dst = tmp_path / "q"
    code, _, err = quantize_cli(capsys, src, dst, "--bits", "8", "--no-eval")
    assert code == 0, err
    assert "router" not in err
    ours = mixchat_logits(dst, IDS)
    np.testing.assert_allclose(ours, mlx_lm_logits(dst, IDS), atol=1e-4, rtol=1e-4)
    assert_close_to_source(ours, reference_logits(src, IDS))
    assert tensors_of(dst)["model.layers.0.mlp.down_proj.scales"].dtype == mx.float16


def test_repo_id_from_local_hf_cache(hf_src, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-mixtral"
    shutil.copytree(hf_src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = quantize_cli(capsys, "acme/tiny-mixtral", tmp_path / "q", "--no-eval", "--quiet")
    assert code == 0, err
    assert (tmp_path / "q" / "config.json").is_file()
    code, _, err = quantize_cli(capsys, "acme/not-downloaded", tmp_path / "q2", "--no-eval")
    assert code == 1
    assert "mixchat download acme/not-downloaded" in one_error_line(err)
    assert not (tmp_path / "q2").exists()


# ----------------------------------------------------------------------------- safety


def test_resume_after_interruption(hf_src, tmp_path, capsys, monkeypatch):
    argv = ["--no-eval", "--quiet", "--max-shard-size", "1MB"]
    ref = tmp_path / "ref"
    assert quantize_cli(capsys, hf_src, ref, *argv)[0] == 0
    shards = sorted(p.name for p in ref.glob("model-*.safetensors"))
    assert len(shards) >= 3

    # Ctrl-C in the middle of the second shard.
    dst, partial = tmp_path / "q", tmp_path / "q.partial"
    real_quantize_item, real_write_shard = qc.quantize_item, qc.write_shard
    first_shard_items = len(
        qc.make_plan(_open(hf_src), qc.Settings(max_shard_bytes=10**6)).shards[0].items
    )
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == first_shard_items + 1:
            raise KeyboardInterrupt
        return real_quantize_item(*args, **kwargs)

    monkeypatch.setattr(qc, "quantize_item", interrupted)
    code, _, err = quantize_cli(capsys, hf_src, dst, *argv)
    assert code == 130 and "resume" in err
    assert not dst.exists()  # nothing that looks complete
    assert sorted(p.name for p in partial.iterdir()) == [shards[0], "progress.json"]
    (partial / f"{shards[1]}.tmp").write_bytes(b"half a shard from a killed run")

    # Re-running the same command writes only the missing shards.
    monkeypatch.setattr(qc, "quantize_item", real_quantize_item)
    written = []

    def spy(path, shard, *args, **kwargs):
        written.append(shard.name)
        return real_write_shard(path, shard, *args, **kwargs)

    monkeypatch.setattr(qc, "write_shard", spy)
    code, _, err = quantize_cli(capsys, hf_src, dst, *argv)
    assert code == 0, err
    assert written == shards[1:]
    assert not partial.exists()
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in ref.iterdir())
    for name in shards:
        assert sha256(dst / name) == sha256(ref / name)


def _open(path: Path):
    from quantize.sources import open_source

    return open_source(path)


def test_resume_rechecks_hashes_and_settings(hf_src, tmp_path, capsys, monkeypatch):
    argv = ["--no-eval", "--max-shard-size", "1MB"]
    dst, partial = tmp_path / "q", tmp_path / "q.partial"
    real_write_shard = qc.write_shard
    written = []

    def stop_after_two(path, shard, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(shard.name)
        return real_write_shard(path, shard, *args, **kwargs)

    monkeypatch.setattr(qc, "write_shard", stop_after_two)
    assert quantize_cli(capsys, hf_src, dst, *argv)[0] == 130
    first, second = written
    with open(partial / first, "r+b") as f:  # silent corruption of a finished shard
        f.seek(-3, 2)
        f.write(b"\x00\xff\x00")

    written.clear()
    monkeypatch.setattr(
        qc, "write_shard", lambda *a, **k: written.append(a[1].name) or real_write_shard(*a, **k)
    )
    code, _, err = quantize_cli(capsys, hf_src, dst, *argv)
    assert code == 0 and f"{first} in q.partial is damaged" in err
    assert first in written and second not in written

    # Other settings: an interrupted run is not resumed but started over.
    monkeypatch.setattr(qc, "write_shard", stop_after_two)
    written.clear()
    assert quantize_cli(capsys, hf_src, tmp_path / "r", *argv)[0] == 130
    monkeypatch.setattr(
        qc, "write_shard", lambda *a, **k: written.append(a[1].name) or real_write_shard(*a, **k)
    )
    written.clear()
    code, _, err = quantize_cli(capsys, hf_src, tmp_path / "r", "--bits", "8", *argv)
    assert code == 0 and "starting over" in err
    assert len(written) == len(list((tmp_path / "r").glob("model-*.safetensors")))


def test_existing_destination_needs_force(hf_src, tmp_path, capsys):
    dst = tmp_path / "q"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    (dst / "keep.txt").write_text("precious")
    code, out, err = quantize_cli(capsys, hf_src, dst, "--no-eval")
    assert code == 1 and "--force" in one_error_line(err)
    assert (dst / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "q.partial").exists()
    code, _, err = quantize_cli(capsys, hf_src, dst, "--no-eval", "--force", "--quiet")
    assert code == 0, err
    assert not (dst / "keep.txt").exists() and "quantization" in (dst / "config.json").read_text()

    # --force never deletes a directory that is not a model (a typo'd DST like "~" or ".").
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    code, _, err = quantize_cli(capsys, hf_src, home, "--no-eval", "--force")
    assert code == 1 and "not a model directory" in one_error_line(err)
    assert (home / "notes.txt").exists()


def test_not_enough_disk_space(hf_src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qc, "_free_space", lambda path: 1000)
    code, _, err = quantize_cli(capsys, hf_src, tmp_path / "q", "--no-eval")
    assert code == 1 and "not enough disk space" in one_error_line(err)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


class _Booby:
    """Unpickling this touches a file: proof that nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _break(kind: str, src: Path, broken: Path) -> None:
    shutil.copytree(src, broken)
    config = broken / "config.json"
    shards = sorted(broken.glob("model-*.safetensors"))
    if kind == "missing config":
        config.unlink()
    elif kind == "unknown architecture":
        config.write_text(config.read_text().replace('"mixtral"', '"jamba"'))
    elif kind == "truncated shard":
        with open(shards[-1], "r+b") as f:
            f.truncate(shards[-1].stat().st_size - 100)
    elif kind == "missing shard":
        shards[1].unlink()
    elif kind == "shape mismatch":
        config.write_text(
            config.read_text().replace('"intermediate_size": 128', '"intermediate_size": 96')
        )
    elif kind in ("pickle only", "mistral pickle only"):
        for shard in broken.glob("*.safetensors"):
            shard.unlink()
        (broken / "model.safetensors.index.json").unlink()
        name = "pytorch_model.bin" if kind == "pickle only" else "consolidated.00.pth"
        (broken / name).write_bytes(pickle.dumps(_Booby(broken / "UNPICKLED")))
        if kind == "mistral pickle only":
            config.rename(broken / "params.json")
    else:
        raise ValueError(kind)


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing config", "missing config.json"),
        ("unknown architecture", "unsupported architecture 'jamba'"),
        ("truncated shard", "is truncated"),
        ("missing shard", "missing shard model-00002-of-"),
        ("shape mismatch", "has shape [128, 64] but config.json implies [96, 64]"),
        ("pickle only", "never unpickles"),
        ("mistral pickle only", "never unpickles"),
    ],
)
def test_broken_sources(hf_src, tmp_path, capsys, kind, message):
    broken = tmp_path / "broken"
    _break(kind, hf_src, broken)
    dst = tmp_path / "q"
    code, out, err = quantize_cli(capsys, broken, dst)
    assert code == 1
    assert message in one_error_line(err)
    assert out == ""
    assert not dst.exists() and not (tmp_path / "q.partial").exists()
    assert not (broken / "UNPICKLED").exists()


# ----------------------------------------------------------------------------- report


def test_quality_report_matches_numpy(hf_src, tmp_path, capsys):
    import sentencepiece
    import torch
    import transformers

    from model import load

    dst = tmp_path / "q4"
    code, out, err = quantize_cli(capsys, hf_src, dst)
    assert code == 0, err
    assert "perplexity" in out and "KL divergence" in out and "router" in out
    report = json.loads((dst / "quantization_report.json").read_text())

    sp = sentencepiece.SentencePieceProcessor(model_file=str(hf_src / "tokenizer.model"))
    ids = [1, *sp.encode(eval_text())]
    assert report["tokens"] == len(ids) > 300

    # Source: transformers, with its own router logits. Quantized: mlx-lm's logits, mixchat's routing.
    ref = transformers.MixtralForCausalLM.from_pretrained(hf_src, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(torch.tensor([ids]), output_router_logits=True)
    src_logits = out.logits[0].double().numpy()
    src_routes = np.stack([torch.topk(r, 2, dim=-1).indices.numpy() for r in out.router_logits])
    q_logits = mlx_lm_logits(dst, ids)[0].astype(np.float64)
    model, _ = load(dst)
    model.routing = []
    model(mx.array([ids]))
    q_routes = np.stack([np.array(r[0]) for r in model.routing])

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(src_logits)[:-1], log_softmax(q_logits)[:-1]
    nxt = np.array(ids[1:])
    ppl_src = np.exp(-lp[np.arange(len(nxt)), nxt].mean())
    ppl_q = np.exp(-lq[np.arange(len(nxt)), nxt].mean())
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    agree = np.mean(
        [
            set(a) == set(b)
            for a, b in zip(src_routes.reshape(-1, 2), q_routes.reshape(-1, 2), strict=True)
        ]
    )

    assert report["perplexity_source"] == pytest.approx(ppl_src, rel=1e-3)
    assert report["perplexity_quantized"] == pytest.approx(ppl_q, rel=1e-3)
    assert report["kl_divergence"] == pytest.approx(kl, rel=1e-3)
    assert report["router_agreement"] == pytest.approx(agree, abs=0.01)
    assert report["top1_agreement"] == pytest.approx(
        np.mean(lp.argmax(-1) == lq.argmax(-1)), abs=0.01
    )
    assert 0 < report["kl_divergence"] and 0 < report["router_agreement"] < 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
        dict(model_type="mistral"),
        dict(model_type="llama", tie_word_embeddings=True),
    ],
)
def test_parameter_shapes_are_the_model_definition(kw):
    """Quantize's tensor shapes and info's counts come from model.config.parameter_shapes,
    which must be exactly model.mixtral's parameters."""
    from mlx.utils import tree_flatten

    from model import Model
    from model.config import ModelArgs, parameter_shapes
    from model.info import parameter_counts

    args = ModelArgs(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, **kw)  # fmt: skip
    shapes = parameter_shapes(args)
    assert shapes == {n: tuple(p.shape) for n, p in tree_flatten(Model(args).parameters())}
    total, active = parameter_counts(args)
    assert total == sum(int(np.prod(s)) for s in shapes.values())
    experts = sum(int(np.prod(s)) for n, s in shapes.items() if ".switch_mlp." in n)
    assert active == total - experts // 2 * (args.is_moe)


def test_through_the_mixchat_command(hf_src, tmp_path, capsys):
    """The same subcommands, reached through `mixchat` itself (app/cli.py registers them)."""
    cli = pytest.importorskip("app.cli")
    assert cli.main(["quantize", str(hf_src), str(tmp_path / "q"), "--no-eval", "--quiet"]) == 0
    assert (tmp_path / "q" / "model.safetensors").is_file()
    assert cli.main(["quantize", str(hf_src), str(tmp_path / "q5"), "--bits", "5"]) == 2
    assert "invalid choice: 5" in capsys.readouterr().err
    assert cli.main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "q6")]) == 1
    assert capsys.readouterr().err == f"mixchat: error: no model at '{tmp_path / 'nowhere'}'\n"
