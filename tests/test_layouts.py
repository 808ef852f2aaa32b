"""MLX community layouts (mlx_lm.convert output and its variants) against mlx-lm loading the
same directory: routers quantized or in float, legacy weights.NN.safetensors shards,
`quantization_config` only."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from model.errors import UnsupportedModelError
from model.weights import build_model, locate
from tests.test_quantize import mlx_lm_logits

IDS = [1, 415, 5565, 302, 4843, 349, 28705, 28770, 28723, 13, 28705, 9933]


@pytest.fixture(scope="module")
def converted(tiny_mixtral, tmp_path_factory):
    """mlx_lm.convert's 4-bit output of the tiny Mixtral (its routers quantized too)."""
    import mlx_lm

    out = tmp_path_factory.mktemp("mlx") / "q4"
    mlx_lm.convert(str(tiny_mixtral), str(out), quantize=True, q_group_size=32, q_bits=4)
    return out


def _ours(path) -> np.ndarray:
    model = build_model(locate(path))
    return np.array(model(mx.array([IDS])))


def _variant(converted, tmp_path, name: str):
    path = tmp_path / name
    shutil.copytree(converted, path)
    return path


def test_mlx_lm_convert_output(converted):
    assert "model.layers.0.block_sparse_moe.gate.scales" in locate(converted).tensors
    np.testing.assert_allclose(_ours(converted), mlx_lm_logits(converted, IDS), atol=1e-4)


def test_float_router_legacy_shards_and_quantization_config(converted, tmp_path):
    """Routers in float (a perturbed copy of the 4-bit ones; checked per module, as mlx-lm
    does); then the same
    weights in a legacy weights.00.safetensors without an index, with only
    `quantization_config` (mlx-lm itself reads neither: it is the reference on the first)."""
    path = _variant(converted, tmp_path, "float-router")
    weights = mx.load(str(path / "model.safetensors"))
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe.gate"
        weights[f"{p}.weight"] = mx.dequantize(
            weights[f"{p}.weight"], weights.pop(f"{p}.scales"), weights.pop(f"{p}.biases"),
            group_size=32, bits=4,
        ).astype(mx.float32) + 0.05 * mx.random.normal((4, 64), key=mx.random.key(layer))  # fmt: skip
    (path / "model.safetensors.index.json").unlink()
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    checkpoint = locate(path)
    assert "model.layers.0.block_sparse_moe.gate.scales" not in checkpoint.tensors
    model = build_model(checkpoint)
    assert "scales" not in model.layers[0].block_sparse_moe.gate
    ours = np.array(model(mx.array([IDS])))
    np.testing.assert_allclose(ours, mlx_lm_logits(path, IDS), atol=1e-4)
    assert np.abs(ours - _ours(converted)).max() > 1e-2  # the float router is the one used

    legacy = _variant(path, tmp_path, "legacy")
    (legacy / "model.safetensors").rename(legacy / "weights.00.safetensors")
    config = json.loads((legacy / "config.json").read_text())
    del config["quantization"]
    (legacy / "config.json").write_text(json.dumps(config))
    assert locate(legacy).files == [legacy / "weights.00.safetensors"]
    np.testing.assert_array_equal(_ours(legacy), ours)


def test_hugging_face_quantization_config_is_refused(converted, tmp_path):
    path = _variant(converted, tmp_path, "gptq")
    config = json.loads((path / "config.json").read_text())
    del config["quantization"]
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'gptq' are not supported"):
        locate(path)
