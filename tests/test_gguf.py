"""GGUF files (model/gguf.py, the GGUF parts of model/weights.py and model/tokenizer.py) against
references nobody here wrote: gguf-py's `gguf.quants.dequantize` for every block type,
transformers' MixtralForCausalLM holding gguf-py's dequantized weights for whole models,
sentencepiece and mistral-common for the tokenizer rebuilt from GGUF metadata."""

from __future__ import annotations

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

from model import load
from model.errors import CheckpointError, MixchatError, UnsupportedModelError
from model.gguf import AFFINE, expert_range, load_tensor, read_bytes, read_gguf, to_affine
from model.info import describe_quantization, model_info
from model.tokenizer import SentencePieceTokenizer, load_tokenizer
from model.weights import build_model, locate
from tests.checkpoints import gguf_reader, mistral_tokenizer_file
from tests.gguf_files import (
    random_blocks,
    sentencepiece_metadata,
    tiny_mixtral_gguf,
    transformers_mixtral,
    write_gguf,
)

HIDDEN, HEADS, KV_HEADS = 256, 4, 2
Q4_K_M = {  # llama.cpp's Q4_K_M choices for a Mixtral (Q8_0 attn_k/attn_v with 8 experts)
    "embd": "Q4_K", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q8_0", "attn_v": "Q8_0",
    "attn_output": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K",
    "ffn_down.1": "Q4_K",
}
Q5_K_M = {**Q4_K_M, "embd": "Q5_K", "attn_q": "Q5_K", "attn_output": "Q5_K", "ffn_gate": "Q5_K",
          "ffn_up": "Q5_K", "ffn_down.1": "Q5_K"}
EXACT = {  # only types mapped exactly onto MLX affine groups (and float)
    "embd": "Q4_0", "output": "Q8_0", "attn_q": "Q5_0", "attn_k": "Q5_1", "attn_v": "Q4_1",
    "attn_output": "Q3_K", "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "F16",
}
PROMPT = [{"role": "user", "content": "Bonjour, comment ça va ? Tell me a story about dragons."}]
SMALL_VOCAB = 1024  # whole-model comparisons: the first 1024 pieces (bytes, common pieces)
IDS = [1, *np.random.default_rng(5).integers(3, SMALL_VOCAB, 23).tolist()]


def _single_tensor_gguf(path: Path, kind: str, raw: np.ndarray) -> Path:
    return write_gguf(path, {"block_count": 0}, {}, {"t.weight": (kind, raw)})


# ---------------------------------------------------------------------------------------------
# Block conversion vs gguf-py


@pytest.mark.parametrize("kind", sorted(AFFINE))
def test_blocks_match_gguf_py(tmp_path, kind):
    """MLX's dequantize of the converted tensor equals gguf-py's dequantize of the same bytes:
    exactly for the exact types; for Q6_K and Q2_K within one 8-bit step (half a step for
    99% of weights) and 1% RMS."""
    rng = np.random.default_rng(1)
    raw = random_blocks(kind, (6, 512), 0.3, rng)
    f = read_gguf(_single_tensor_gguf(tmp_path / f"{kind}.gguf", kind, raw))
    t = f.tensors["t.weight"]
    assert t.ggml_type == kind and t.shape == (6, 512)
    ref = gguf.quants.dequantize(read_bytes(f.path, t.offset, t.nbytes).reshape(6, -1),
                                 gguf.GGMLQuantizationType[kind])
    arrays = load_tensor(f, t)
    bits, exact = AFFINE[kind]
    assert arrays["scales"].dtype == np.float32 and arrays["scales"].shape == (6, 16)
    got = np.array(mx.dequantize(*(mx.array(arrays[k]) for k in ("weight", "scales", "biases")),
                                 group_size=32, bits=bits))
    if exact:
        np.testing.assert_array_equal(got, ref)
    else:
        err = np.abs(got - ref).reshape(6, 16, 32)
        step = np.abs(arrays["scales"])[..., None]
        assert (err <= step * (1 + 1e-5) + 1e-7).all() and (err <= step / 2 + 1e-7).mean() > 0.99
        assert np.sqrt((err**2).mean()) < 0.01 * ref.std()


def test_expert_bytes_convert_alone(tmp_path):
    """An expert's byte range, converted on its own, is that expert's slice of the tensor."""
    rng = np.random.default_rng(2)
    raw = random_blocks("Q4_K", (4, 8, 256), 0.3, rng)
    f = read_gguf(_single_tensor_gguf(tmp_path / "experts.gguf", "Q4_K", raw))
    t = f.tensors["t.weight"]
    whole = load_tensor(f, t)
    for e in range(4):
        offset, nbytes = expert_range(t, e)
        w, s, b, bits, group = to_affine("Q4_K", read_bytes(f.path, offset, nbytes), (8, 256))
        assert (bits, group) == (4, 32)
        np.testing.assert_array_equal(w, whole["weight"][e])
        np.testing.assert_array_equal(s, whole["scales"][e])
        np.testing.assert_array_equal(b, whole["biases"][e])


def _reader_view(path: Path) -> tuple[dict, dict]:
    """gguf-py's GGUFReader's metadata and tensor table, in read_gguf's terms."""
    reader = gguf_reader(str(path))  # the default model's: parsed once per session
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: (t.tensor_type.name, tuple(reversed(t.shape.tolist())), int(t.data_offset),
                 int(t.n_bytes))
        for t in reader.tensors
    }  # fmt: skip
    return meta, tensors


def test_header_matches_gguf_py_reader(tmp_path):
    """read_gguf's own header parse reads what gguf.GGUFReader reads: the default model's
    (BPE vocabulary and merges, Q4_1/Q8_0/F32) and a K-quant Mixtral's (scores, token types)."""
    from model.registry import resolve

    mixtral, _ = tiny_mixtral_gguf(tmp_path / "m.gguf", Q4_K_M, vocab=SMALL_VOCAB,
                                   with_values=False)  # fmt: skip
    for path in (resolve(None), mixtral):
        meta, tensors = _reader_view(path)
        f = read_gguf(path)
        ours = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in f.metadata.items()}
        assert ours == meta
        assert {t.name: (t.ggml_type, t.shape, t.offset, t.nbytes)
                for t in f.tensors.values()} == tensors  # fmt: skip


def test_unsupported_type_is_refused_in_one_line(tmp_path):
    raw = np.zeros((2, 256 // 256 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL][1] * 8),
                   np.uint8)
    path = _single_tensor_gguf(tmp_path / "iq.gguf", "IQ4_NL", raw)
    with pytest.raises(UnsupportedModelError, match=r"t.weight is IQ4_NL; mixchat reads Q4_0"):
        locate(path)


def test_truncated_gguf_is_refused(tmp_path):
    raw = random_blocks("Q8_0", (4, 256), 0.3, np.random.default_rng(0))
    path = _single_tensor_gguf(tmp_path / "cut.gguf", "Q8_0", raw)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="cut.gguf.*truncated") as info:
        locate(path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Whole models vs transformers on gguf-py's dequantized weights


def _file_type(path: Path) -> str:
    """general.file_type as gguf-py names it ("mixed" when the file does not say)."""
    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "mixed"
    return gguf.LlamaFileType(field.contents()).name.removeprefix("MOSTLY_")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _compare(path: Path, values: dict) -> tuple[float, float, float]:
    """(mean KL(reference || ours) per token, top-1 agreement, max |logit difference|)."""
    import torch

    reference = transformers_mixtral(values, HIDDEN, HEADS, KV_HEADS)
    model = build_model(locate(path))
    with torch.no_grad():
        ref = reference(torch.tensor([IDS])).logits.float().numpy()[0]
    ours = np.array(model(mx.array([IDS]))[0])
    lr, lo = _log_softmax(ref), _log_softmax(ours)
    kl = float((np.exp(lr) * (lr - lo)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == ours.argmax(-1)).mean()), float(np.abs(ref - ours).max())


@pytest.mark.parametrize("types", [Q4_K_M, Q5_K_M], ids=["Q4_K_M", "Q5_K_M"])
def test_k_quant_mixtral_matches_transformers(tmp_path, types):
    path, values = tiny_mixtral_gguf(tmp_path / "mixtral.gguf", types, vocab=SMALL_VOCAB)
    kl, top1, _ = _compare(path, values)
    assert kl <= 2e-4 and top1 >= 0.9  # near-ties may flip: the criterion is the KL


def test_exact_types_per_expert_layout_match_at_float_rounding(tmp_path):
    """Older GGUFs store experts one tensor each (ffn_gate.{e}); exactly mapped types only."""
    path, values = tiny_mixtral_gguf(tmp_path / "exact.gguf", EXACT, stacked=False,
                                     vocab=SMALL_VOCAB)
    kl, top1, diff = _compare(path, values)
    assert kl <= 1e-8 and top1 == 1.0 and diff <= 1e-3


def test_full_vocabulary_gguf_chats_and_info(tmp_path):
    """A Q4_K_M Mixtral GGUF with Mistral's whole v1 vocabulary: `load` gives the tokenizer
    that encodes chats as mistral-common does; info counts its types and memory."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from tests.test_tokenizer import _reference_tokens

    path, _ = tiny_mixtral_gguf(tmp_path / "m.gguf", Q4_K_M, with_values=False)
    model, tokenizer = load(str(path))
    reference = MistralTokenizer.from_file(str(mistral_tokenizer_file("v1")))
    ids = tokenizer.encode_chat(PROMPT)
    assert ids == _reference_tokens(reference, PROMPT)
    assert model(mx.array([ids])).shape == (1, len(ids), 32000)
    checkpoint = locate(path)
    tensors = checkpoint.gguf_file.tensors.values()
    elements = sum(int(np.prod(t.shape)) for t in tensors)
    bits = sum(  # from ggml's block sizes
        int(np.prod(t.shape)) * 8 * size / block
        for t in tensors
        for block, size in [gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.ggml_type]]]
    ) / elements
    assert describe_quantization(checkpoint) == f"GGUF {_file_type(path)}, {bits:.2f} bits/weight"
    info = model_info(checkpoint, "m", compute_bytes=4)
    # Q4_K: embd, 2x(attn_q, attn_output, gate, up) + layer 1's down; Q6_K: output + layer 0's down
    assert info.tensor_types == "10 Q4_K, 7 F32, 4 Q8_0, 2 Q6_K"
    from tests.test_cli import mixchat

    result = mixchat("info", str(path))
    assert result.returncode == 0, result.stderr.decode()
    assert "tensor types   10 Q4_K, 7 F32, 4 Q8_0, 2 Q6_K" in result.stdout.decode()
    expected = 0
    for t in checkpoint.gguf_file.tensors.values():
        n = int(np.prod(t.shape))
        expected += n * 4 if t.ggml_type == "F32" else n * AFFINE[t.ggml_type][0] // 8 + n // 32 * 8
    assert info.memory_bytes == expected and info.architecture == "mixtral" and info.num_experts == 4


# ---------------------------------------------------------------------------------------------
# The GGUF's SentencePiece tokenizer


@pytest.fixture(scope="module", params=["v1", "v3"])
def gguf_and_file_tokenizers(request):
    file = mistral_tokenizer_file(request.param)
    return load_tokenizer(sentencepiece_metadata(file)), SentencePieceTokenizer(file), file


def test_gguf_sentencepiece_encodes_as_sentencepiece(gguf_and_file_tokenizers):
    from tests.test_tokenizer import TEXTS

    ours, reference, _ = gguf_and_file_tokenizers
    assert (ours.bos_id, ours.eos_ids, ours.vocab_size) == (
        reference.bos_id, reference.eos_ids, reference.vocab_size)
    rng = np.random.default_rng(0)
    texts = TEXTS + ["".join(rng.choice(TEXTS, 3)) for _ in range(50)]
    for text in texts:
        ids = reference.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == reference.decode(ids)
        detok = ours.detokenizer()
        assert "".join(detok.add(i) for i in ids) + detok.finish() == reference.decode(ids)


def test_gguf_chats_encode_as_mistral_common(gguf_and_file_tokenizers):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from tests.test_tokenizer import _conversation, _reference_tokens

    ours, _, file = gguf_and_file_tokenizers
    reference = MistralTokenizer.from_file(str(file))
    compared = 0
    for seed in range(40):
        messages = _conversation(seed)
        expected = _reference_tokens(reference, messages)
        if expected is not None:
            assert ours.encode_chat(messages) == expected, messages
            compared += 1
    assert compared >= 30


def test_non_mistral_vocabulary_uses_the_gguf_template():
    """A SentencePiece vocabulary that is not Mistral's (one piece renamed) renders the GGUF's
    chat template, its control tokens written as text becoming their ids."""
    meta = sentencepiece_metadata(mistral_tokenizer_file("v1"))
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"][:-1], "▁zzzz"]
    meta["tokenizer.chat_template"] = (
        "{{ bos_token }}{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}{{ eos_token }}"
        "{% endfor %}"
    )
    tok = load_tokenizer(meta)
    ids = tok.encode_chat([{"role": "user", "content": "Hi there"}])
    assert ids == [1, *tok.encode("<<user>> Hi there"), 2]
    del meta["tokenizer.chat_template"]
    with pytest.raises(MixchatError, match="no chat template"):
        load_tokenizer(meta).encode_chat([{"role": "user", "content": "Hi"}])


def test_q4_k_m_mixtral_streams_experts_under_a_budget(tmp_path):
    """--memory-budget on a GGUF: its experts are read on demand from the GGUF's byte ranges
    and converted as the whole-model loader converts them: the same greedy tokens, within the
    budget, each expert read as its own blocks (misses x the expert's GGUF bytes)."""
    from model import Engine, GenerationSettings
    from model.memory_plan import memory_plan

    path, _ = tiny_mixtral_gguf(tmp_path / "q4km.gguf", Q4_K_M, with_values=False, layers=3)
    settings = GenerationSettings(max_tokens=12, temperature=0.0)
    whole = Engine.load(str(path), max_context=256)
    expected = "".join(c.text for c in whole.stream(PROMPT, settings))
    plan = memory_plan(locate(path), 4, 256)
    assert plan.offloadable, plan.why_not
    gguf_file = read_gguf(path)
    per_layer = [
        sum(expert_range(gguf_file.tensors[f"blk.{i}.ffn_{p}_exps.weight"], 1)[1]
            for p in ("gate", "up", "down"))
        for i in range(3)
    ]  # fmt: skip
    assert plan.expert_disk_bytes == max(per_layer)  # the GGUF's blocks, not their conversion
    budget = plan.minimum_budget + 2 * plan.expert_bytes
    engine = Engine.load(str(path), memory_budget=budget, max_context=256)
    runtime = engine.offload
    assert runtime is not None
    chunks = list(engine.stream(PROMPT, settings))
    assert "".join(c.text for c in chunks) == expected
    stats = chunks[-1].stats
    counters = runtime.snapshot()
    assert counters.reads > 0 and runtime.cache.peak <= runtime.capacity
    assert counters.bytes_read <= counters.reads * plan.expert_disk_bytes
    assert 0 <= stats.expert_hit_rate < 1
