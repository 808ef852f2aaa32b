"""The fast offline lexical guard: curated rules (lexicon.json) in English, French, German,
Spanish and Italian, plus PII patterns.

Words match whole (never inside another word), with stems for inflections; a rule needs all
its groups in one sentence and none of its exceptions, so "kill a stuck process" or the
history of the atomic bomb pass while "I will kill you" and bomb-making instructions do not.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from pathlib import Path

from .result import CATEGORIES, ModerationResult

LEXICON = Path(__file__).with_name("lexicon.json")
SENTENCES = re.compile(r"[.!?;:\n]+|\s[-–—]\s")
DEFAULT_SCORE = 0.9


LEET = str.maketrans("013457@$", "oieastas")
MIXED = re.compile(r"(?<![\w@$])(?=[\w@$]*[a-z])(?=[\w@$]*[013457@$])[\w@$]+")


def normalize(text: str) -> str:
    """Lowercase, accents off (ö -> o, é -> e, ß -> ss), one kind of apostrophe, and digits
    read as letters inside words that mix them ("k1ll" -> "kill"; numbers stay numbers)."""
    text = text.lower().replace("ß", "ss").replace("’", "'").replace("`", "'")
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return MIXED.sub(lambda m: m.group().translate(LEET), text)


def compile_group(spec: str) -> re.Pattern:
    """A lexicon group -> one regex: ' ?' optional separator, ' ' / '-' / "'" any separator,
    '*' a word ending; whole words only."""
    body = spec.replace(" ?", "\0").replace("*", r"\w*")
    body = re.sub(r"[ \-']", r"[\\W_]+", body).replace("\0", r"[\W_]*")
    return re.compile(rf"(?<!\w)(?:{body})(?:(?!\w)|(?<=[\W_]))")


class Rule:
    def __init__(self, category: str, all_of: list[re.Pattern], none_of: list[re.Pattern],
                 score: float):  # fmt: skip
        if category not in CATEGORIES:
            raise ValueError(f"lexicon: unknown category {category!r}")
        self.category, self.all_of, self.none_of, self.score = category, all_of, none_of, score

    def fires(self, sentence: str) -> bool:
        return all(p.search(sentence) for p in self.all_of) and not any(
            p.search(sentence) for p in self.none_of
        )


def load_rules(path: Path = LEXICON) -> list[Rule]:
    data = json.loads(path.read_text(encoding="utf-8"))
    groups = {name: compile_group(spec) for name, spec in data["groups"].items()}

    def pattern(ref: str) -> re.Pattern:
        return groups[ref] if ref in groups else compile_group(ref)

    return [
        Rule(r["category"], [pattern(g) for g in r["all"]], [pattern(g) for g in r.get("none", [])],
             r.get("score", DEFAULT_SCORE))  # fmt: skip
        for r in data["rules"]
    ]


# PII: each match is one item; a card (Luhn), IBAN, US SSN or a password counts as a dump alone.
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
PHONE = re.compile(r"(?<![\w+])\+?\d[\d ().-]{7,}\d(?!\w)")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?\b")
SSN = re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")
SECRET = compile_group(
    "(my |the |his |her )?(password|passcode|pin|mot de passe|mdp|code pin|passwort|kennwort|"
    "contrasena|clave|parola d'ordine|codice pin) (is|est|ist|es|e|:)"
)
ID_WORDS = compile_group(
    "social security (number)?|passport number|date of birth|home address|numero de securite "
    "sociale|date de naissance|adresse|sozialversicherungsnummer|geburtsdatum|wohnadresse|"
    "numero de la seguridad social|fecha de nacimiento|direccion|codice fiscale|data di nascita|"
    "indirizzo|dni|nie|steuer-id|carte vitale"
)


def luhn(digits: str) -> bool:
    total, double = 0, False
    for ch in reversed(digits):
        d = int(ch) * (2 if double else 1)
        total += d - 9 if d > 9 else d
        double = not double
    return total % 10 == 0


def pii_score(text: str, normalized: str) -> float:
    cards = [m for m in CARD.findall(text) if luhn(re.sub(r"\D", "", m))]
    strong = bool(cards or IBAN.search(text) or SSN.search(text) or SECRET.search(normalized))
    phones = [m for m in PHONE.findall(text) if len(re.sub(r"\D", "", m)) >= 9 and m not in cards]
    items = len(EMAIL.findall(text)) + len(phones) + len(ID_WORDS.findall(normalized))
    if strong or items >= 2:
        return 0.9
    return 0.3 if items else 0.0


class LexicalGuard:
    """Offline, model-free, microseconds per sentence."""

    name = "lexical"

    def __init__(self, rules: list[Rule] | None = None):
        self.rules = load_rules() if rules is None else rules

    def check(self, text: str, role: str = "user") -> ModerationResult:
        start = time.perf_counter()
        normalized = normalize(text)
        scores = dict.fromkeys(CATEGORIES, 0.0)
        # Only rules whose every group occurs somewhere are tried sentence by sentence.
        rules = [r for r in self.rules if all(p.search(normalized) for p in r.all_of)]
        for sentence in SENTENCES.split(normalized) if rules else ():
            if not sentence.strip():
                continue
            for rule in rules:
                if rule.score > scores[rule.category] and rule.fires(sentence):
                    scores[rule.category] = rule.score
        scores["pii"] = max(scores["pii"], pii_score(text, normalized))
        return ModerationResult(scores, self.name, time.perf_counter() - start)

    def reasons(self, text: str) -> list[tuple[str, str]]:
        """(category, sentence) for each rule that fires: what the benchmark and tuning show."""
        out = []
        for sentence in SENTENCES.split(normalize(text)):
            out += [(r.category, sentence) for r in self.rules if sentence.strip() and r.fires(sentence)]
        return out
