"""model/generation's parts the server's replies go through: one request sampler (seeded: the
draws mlx-lm makes after mx.random.seed), rows sampled each their own way, `stop` strings over
an Engine stream, and a batched row's tokens -> text and finish reason."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from model.generate import Chunk, GenerationStats
from model.generation.reply import ReplyText
from model.generation.sampling import greedy, request_sampler, sample_rows
from model.generation.stops import stop_at
from model.generation_settings import GenerationSettings


def logprobs(rows: int = 1, seed: int = 0) -> mx.array:
    logits = mx.random.normal((rows, 50), key=mx.random.key(seed)) * 3
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_a_seeded_sampler_draws_what_mlx_lm_draws_after_seeding():
    for temperature, top_p, min_p in [(1.0, 1.0, 0.0), (0.8, 0.9, 0.0), (1.2, 1.0, 0.1),
                                      (0.7, 0.8, 0.05)]:  # fmt: skip
        settings = GenerationSettings(temperature=temperature, top_p=top_p, min_p=min_p, seed=11)
        ours = request_sampler(settings)
        mx.random.seed(11)
        theirs = make_sampler(temperature, top_p, min_p)
        expected = [theirs(logprobs(seed=i)).item() for i in range(30)]
        mx.random.seed(999)  # the global generator plays no part in a seeded request's draws
        assert [ours(logprobs(seed=i)).item() for i in range(30)] == expected
    assert request_sampler(GenerationSettings(temperature=0, seed=3)) is greedy


def test_rows_sample_each_their_own_way():
    seeded = [GenerationSettings(temperature=0.9, top_p=0.9, seed=s) for s in (1, 2)]
    alone = [request_sampler(s) for s in seeded]
    together = [request_sampler(s) for s in seeded]
    batch = [greedy, *together]
    for step in range(10):
        lp = logprobs(3, seed=step)
        tokens = sample_rows(lp, batch).tolist()
        assert tokens[0] == mx.argmax(lp[0]).item()
        assert tokens[1:] == [alone[i](lp[i + 1 : i + 2]).item() for i in range(2)]
    both = logprobs(2)
    assert sample_rows(both, [greedy, greedy]).tolist() == mx.argmax(both, -1).tolist()


def chunks(*texts: str, reason: str = "length"):
    yield Chunk("", progress=(1, 2))
    yield from (Chunk(t) for t in texts[:-1])
    yield Chunk(texts[-1], GenerationStats(finish_reason=reason))


def test_stop_strings_over_an_engine_stream():
    cancels: list[int] = []
    out = list(stop_at(chunks("Hel", "lo E", "N", "D more", "", "tail"), ["END"],
                       lambda: cancels.append(1)))  # fmt: skip
    assert [c.text for c in out] == ["", "Hel", "lo ", "", "", "", ""]  # one out per chunk in
    assert out[0].progress == (1, 2) and cancels == [1]
    assert out[-1].stats.finish_reason == "stop"
    # no stop: what was held back (a possible start of one) comes with the last chunk
    out = list(stop_at(chunks("a", "b E", "N"), ["END"], lambda: cancels.append(2)))
    assert "".join(c.text for c in out) == "ab EN" and out[-1].stats.finish_reason == "length"
    # a stop in the last chunk's text still ends the reply as "stop"
    out = list(stop_at(chunks("a", "bEND!"), ["END"], lambda: None))
    assert "".join(c.text for c in out) == "ab" and out[-1].stats.finish_reason == "stop"


class Letters:
    """A tokenizer whose token i is the letter chr(97 + i); 0 ends a reply. Its detokenizer
    holds each letter back one token (as a streaming detokenizer may)."""

    eos_ids = {0}

    def detokenizer(self):
        class Held:
            held = ""

            def add(self, token: int) -> str:
                out, self.held = self.held, chr(97 + token)
                return out

            def finish(self) -> str:
                out, self.held = self.held, ""
                return out

        return Held()


def test_a_rows_text_and_finish_reason():
    reply = ReplyText(Letters(), ["cd"], max_tokens=10)
    assert [reply.add(t, False) for t in (1, 2, 3, 4)] == [[], ["b"], [], []]
    assert reply.finish_reason == "stop"  # "cd" matched: nothing of it is sent
    reply = ReplyText(Letters(), [], max_tokens=3)
    assert [reply.add(t, False) for t in (1, 2, 3)] == [[], ["b"], ["c", "d"]]
    assert reply.finish_reason == "length"
    reply = ReplyText(Letters(), ["zz"], max_tokens=9)
    assert [reply.add(t, False) for t in (1, 0)] == [[], ["b"]] and reply.finish_reason == "stop"
    reply = ReplyText(Letters(), [], max_tokens=9)
    assert reply.add(1, False) == [] and reply.add(2, True) == ["b"]
    assert reply.finish_reason == "cancelled"


def test_the_default_batch_is_read_without_mlx():
    """`mixchat serve --help` shows DEFAULT_BATCH: importing it must not import MLX."""
    import subprocess
    import sys

    code = ("import sys; from model.generation.limit import DEFAULT_BATCH, batch_limit; "
            "heavy = {m.split('.')[0] for m in sys.modules} & {'mlx', 'mlx_lm'}; "
            "print(DEFAULT_BATCH, sorted(heavy))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["8", "[]"]
