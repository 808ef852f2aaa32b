"""gpt-oss GGUF files (llama.cpp's architecture "gpt-oss", LLM_ARCH_OPENAI_MOE) as mlx-lm's
gpt_oss model reads them: the config.json fields the file keeps elsewhere, and its MXFP4 experts.

What llama.cpp's converter (convert_hf_to_gguf.py, class GptOssModel) does, and where it is undone:
- `modify_tensors` splits the fused `gate_up_proj` [E, in, 2 * ffn] (and its bias) into
  ffn_gate_exps (rows 0::2) and ffn_up_exps (rows 1::2), transposed to [E, ffn, in], and
  `down_proj` to [E, in, ffn]: exactly mlx-lm's sanitized `mlp.experts.{gate,up,down}_proj`
  (model/names.py GGUF_FAMILY_LAYER_OF maps the names; nothing to reorder).
- `filter_tensors` names the attention sinks `attn_sinks.weight`: model/names.py GGUF_BARE
  drops the suffix (mlx-lm's parameter is `self_attn.sinks`).
- `repack_mxfp4` writes the published MXFP4 blocks (`*_blocks` [E, out, in/32, 16] bytes, two
  E2M1 codes a byte, element 2j in the low nibble; `*_scales` [E, out, in/32] E8M0) as GGML's
  MXFP4: 17 bytes a block of 32, the scale byte then 16 code bytes in which byte j holds element
  j (low nibble) and element j + 16 (high nibble); `transform_nibble_layout` makes that order.
  The codes and scales are the same bits as MLX's `mxfp4` mode (E2M1 codes, E8M0 scale, groups
  of 32; GGML's doubled code values times its halved scale are the same numbers): `mxfp4_to_mlx`
  undoes the nibble order only, so the experts run exactly as published, still in MXFP4.
- `set_gguf_parameters` keeps the sliding window and the experts' width; llama.cpp hard-codes
  the rest (alternating sliding/full layers, sliding first: `set_swa_pattern(2)`), which
  `gpt_oss_config` writes back as config.json has it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CheckpointError
from .gguf import GGUFFile, GGUFTensor, _repair_nibbles, read_bytes

MXFP4 = "MXFP4"
_BLOCK, _BLOCK_BYTES = 32, 17  # gguf-py's GGML_QUANT_SIZES[MXFP4]


def mxfp4_specs(tensor: GGUFTensor) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """What `load_mxfp4` returns, as model/gguf.py's converted_specs: MLX's `mxfp4` weight
    (uint32, 8 codes each) and its E8M0 scales (one byte per 32 values)."""
    *lead, cols = tensor.shape
    if cols % _BLOCK:
        raise CheckpointError(f"GGUF tensor {tensor.name} has rows of {cols}, not a multiple of 32")
    n = int(np.prod(tensor.shape))
    return {
        "weight": ((*lead, cols // 8), "U32", n // 2),
        "scales": ((*lead, cols // _BLOCK), "U8", n // _BLOCK),
    }


def mxfp4_to_mlx(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """GGML MXFP4 blocks (uint8) of a tensor of `shape` -> (uint32 weight [..., cols / 8],
    uint8 scales [..., cols / 32]) of MLX's `mxfp4` mode: the inverse of the converter's
    `transform_nibble_layout` (elements j, j + 16 a byte -> elements 2j, 2j + 1 a byte)."""
    *lead, cols = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, _BLOCK_BYTES)
    if blocks.shape[0] * _BLOCK != int(np.prod(shape)):
        raise CheckpointError(f"{blocks.shape[0]} MXFP4 blocks do not make a tensor of {shape}")
    codes = _repair_nibbles(blocks[:, 1:], 16)
    return (
        np.ascontiguousarray(codes).view(np.uint32).reshape(*lead, cols // 8),
        np.ascontiguousarray(blocks[:, 0]).reshape(*lead, cols // _BLOCK),
    )


def load_mxfp4(gguf: GGUFFile, tensor: GGUFTensor) -> dict[str, np.ndarray]:
    mxfp4_specs(tensor)  # checks the row length
    weight, scales = mxfp4_to_mlx(read_bytes(gguf.path, tensor.offset, tensor.nbytes), tensor.shape)
    return {"weight": weight, "scales": scales}


def gpt_oss_config(config: dict[str, Any], metadata: dict[str, Any], gguf: GGUFFile) -> dict:
    """model/gguf.py family_config's reading of a gpt-oss file, completed as openai/gpt-oss-*'s
    config.json has it: YaRN `rope_scaling`, `layer_types`, the experts' width, and MXFP4
    experts as per-module `quantization` entries (their other tensors keep their own types)."""
    arch = "gpt-oss"
    layers = int(config["num_hidden_layers"])
    config = dict(config, num_local_experts=config["num_experts"],
                  intermediate_size=config.get("moe_intermediate_size")
                  or config.get("intermediate_size"),
                  layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                  + ["sliding_attention"] * (layers % 2))  # fmt: skip
    if metadata.get(f"{arch}.rope.scaling.type") == "yarn":
        # the file keeps no `truncate`: every gpt-oss is published with `truncate: false` (the
        # reference implementation's unrounded correction range, which transformers follows;
        # llama.cpp rounds it)
        scaling = {"rope_type": "yarn", "truncate": False}
        for field, key in (("factor", "factor"), ("beta_fast", "yarn_beta_fast"),
                           ("beta_slow", "yarn_beta_slow"),
                           ("original_max_position_embeddings", "original_context_length")):
            if (value := metadata.get(f"{arch}.rope.scaling.{key}")) is not None:
                scaling[field] = value.item() if hasattr(value, "item") else value
        config["rope_scaling"] = scaling
    from .names import family_gguf_to_mlx

    experts = {family_gguf_to_mlx(t.name, arch).removesuffix(".weight")
               for t in gguf.tensors.values() if t.ggml_type == MXFP4}  # fmt: skip
    if experts:
        mode = {"group_size": _BLOCK, "bits": 4, "mode": "mxfp4"}
        config["quantization"] = dict.fromkeys(sorted(experts), mode)
    return config
