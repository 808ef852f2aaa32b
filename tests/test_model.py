"""The MLX model against transformers' reference implementation, and checkpoint loading."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from model import CheckpointError, UnsupportedModelError, load, weights
from tests.checkpoints import build_hf_checkpoint, reference_logits

TOLERANCE = 1e-4


def random_ids(shape, seed=0, vocab=32000):
    return np.random.RandomState(seed).randint(3, vocab, size=shape)


def our_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    model, _ = load(path)
    return np.array(model(mx.array(ids)))


def test_mixtral_logits_match_transformers(tiny_mixtral):
    ids = random_ids((2, 24))
    ours, ref = our_logits(tiny_mixtral, ids), reference_logits(tiny_mixtral, ids)
    assert ours.shape == ref.shape == (2, 24, 32000)
    assert np.abs(ours - ref).max() <= TOLERANCE


def test_windowed_bf16_sharded_mistral_matches_transformers(tiny_mistral_windowed):
    index = json.loads((tiny_mistral_windowed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2, "fixture should be sharded"
    ids = random_ids((1, 40), seed=1)  # five times the 8-token sliding window
    ours, ref = our_logits(tiny_mistral_windowed, ids), reference_logits(tiny_mistral_windowed, ids)
    assert np.abs(ours - ref).max() <= TOLERANCE
    # The window matters: the same weights without it give different late logits.
    model, _ = load(tiny_mistral_windowed)
    model.args.sliding_window = None
    unwindowed = np.array(model(mx.array(ids)))
    assert np.abs(unwindowed[0, -1] - ref[0, -1]).max() > 100 * TOLERANCE


def test_tied_embeddings_and_top1_routing(tmp_path):
    path = build_hf_checkpoint(
        tmp_path / "tied", "mixtral", tie_word_embeddings=True, top_k=1, num_layers=3, seed=2
    )
    ids = random_ids((1, 16), seed=2)
    assert np.abs(our_logits(path, ids) - reference_logits(path, ids)).max() <= TOLERANCE


def test_router_choices_match_transformers(tiny_mixtral):
    import torch
    import transformers

    ids = random_ids((1, 20), seed=3)
    model, _ = load(tiny_mixtral)
    model.routing = []
    model(mx.array(ids))
    ours = [np.sort(np.array(r).reshape(-1, 2), axis=-1) for r in model.routing]
    reference = transformers.MixtralForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32)
    with torch.no_grad():
        out = reference(torch.tensor(ids), output_router_logits=True)
    assert len(ours) == len(out.router_logits) == 2
    for layer, router_logits in zip(ours, out.router_logits):
        expected = np.sort(torch.topk(router_logits, 2, dim=-1).indices.numpy(), axis=-1)
        np.testing.assert_array_equal(layer, expected)
    model.routing = None
    assert "routing" not in dict(model.parameters())


@pytest.mark.parametrize("fixture", ["tiny_mixtral", "tiny_mistral_windowed"])
def test_kv_cache_decode_equals_full_forward(fixture, request):
    path = request.getfixturevalue(fixture)
    model, _ = load(path)
    ids = random_ids((1, 30), seed=4)
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    pieces = [model(mx.array(ids[:, :13]), cache=cache), model(mx.array(ids[:, 13:18]), cache=cache)]
    pieces += [model(mx.array(ids[:, t : t + 1]), cache=cache) for t in range(18, 30)]
    incremental = np.concatenate([np.array(p) for p in pieces], axis=1)
    assert np.abs(incremental - full).max() <= TOLERANCE


def test_compute_dtype_is_float32_on_cpu_and_overridable(tiny_mistral_windowed):
    model, _ = load(tiny_mistral_windowed)
    assert model.model.embed_tokens.weight.dtype == mx.float32
    model, _ = load(tiny_mistral_windowed, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    with pytest.raises(CheckpointError, match="unknown dtype"):
        load(tiny_mistral_windowed, dtype="int3")


def test_mlx_quantized_directory_matches_mlx_lm(tiny_mixtral, tmp_path):
    """A directory written by mlx_lm.convert, with a per-module override (8-bit routers)."""
    import mlx_lm
    from mlx_lm.convert import convert

    def routers_at_8_bits(path, module, config=None):
        if path.endswith("block_sparse_moe.gate"):
            return {"group_size": 32, "bits": 8}
        return hasattr(module, "to_quantized")

    out = tmp_path / "q4"
    convert(str(tiny_mixtral), str(out), quantize=True, q_group_size=32, q_bits=4,
            quant_predicate=routers_at_8_bits)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["model.layers.0.block_sparse_moe.gate"]["bits"] == 8
    ids = random_ids((1, 12), seed=5)
    ours = our_logits(out, ids)
    peer, _ = mlx_lm.load(str(out))
    peer.set_dtype(mx.float32)
    theirs = np.array(peer(mx.array(ids)).astype(mx.float32))
    assert np.abs(ours - theirs).max() <= 5e-2  # theirs keeps float16 weights, ours float32
    # and 4 bits stays close to the float model
    reference = reference_logits(tiny_mixtral, ids)
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.7  # garbage would be ~0


# ----- bad checkpoints: one clear error, never a crash, never an unpickle -----


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(tiny_mixtral, tmp_path):
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ck")
    tensors = mx.load(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), tensors)
    with pytest.raises(CheckpointError, match=r"lacks tensor model\.layers\.1\.self_attn\.k_proj"):
        load(path)


def test_missing_expert_is_named(tiny_mixtral, tmp_path):
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ck")
    tensors = mx.load(str(path / "model.safetensors"))
    del tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), tensors)
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2\.weight"):
        load(path)


def test_shape_mismatch_with_config(tiny_mixtral, tmp_path):
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape \(4, 96, 64\).*\(4, 128, 64\)"):
        load(path)


def test_truncated_shard(tiny_mistral_windowed, tmp_path):
    path = copy_checkpoint(tiny_mistral_windowed, tmp_path / "ck")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)


def test_missing_shard(tiny_mistral_windowed, tmp_path):
    path = copy_checkpoint(tiny_mistral_windowed, tmp_path / "ck")
    sorted(path.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load(path)


class Exploit:
    """Unpickling this would create a file: proof that nothing was unpickled if it's absent."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_refused_unopened(tiny_mixtral, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(tiny_mixtral / "config.json", path / "config.json")
    marker = tmp_path / "pwned"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load(path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load(path / "pytorch_model.bin")
    assert not marker.exists()


def test_unknown_architecture(tiny_mixtral, tmp_path):
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        load(path)


def test_missing_config_and_empty_dirs(tiny_mixtral, tmp_path):
    path = copy_checkpoint(tiny_mixtral, tmp_path / "ck")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors or .gguf"):
        load(tmp_path / "empty")


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        load(bad)


def test_locate_reads_headers_only(tiny_mixtral):
    checkpoint = weights.locate(tiny_mixtral)
    spec = checkpoint.tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    assert spec.shape == (96, 64) and spec.dtype == "F32"
    assert checkpoint.args.num_local_experts == 4


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_parallel_streams_change_nothing_but_speed(tiny_mixtral, streams, monkeypatch):
    """Splitting matrix products across streams (tokens, output rows, experts) is exact."""
    from model import mixtral

    monkeypatch.setattr(mixtral, "MIN_SPLIT_ELEMENTS", 0)  # split even the tiny weights
    model, _ = load(tiny_mixtral, streams=streams)
    ids = random_ids((1, 40), seed=6)  # 80 expert rows: the sorted prefill path
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    model(mx.array(ids[:, :39]), cache=cache)
    last = np.array(model(mx.array(ids[:, 39:]), cache=cache))  # one token: row splits
    reference = reference_logits(tiny_mixtral, ids)
    assert np.abs(full - reference).max() <= TOLERANCE
    assert np.abs(last[0, -1] - reference[0, -1]).max() <= TOLERANCE
