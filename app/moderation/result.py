"""The one moderation result: what every guard returns and every surface shows (model-free).

Categories are Mistral's moderation API's, plus jailbreaking. The advice categories (health,
financial, law) are reported with their scores but do not flag unless the policy asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CATEGORIES = (
    "sexual",
    "hate_and_discrimination",
    "violence_and_threats",
    "dangerous_and_criminal_content",
    "selfharm",
    "health",
    "financial",
    "law",
    "pii",
    "jailbreaking",
)
ADVICE = frozenset({"health", "financial", "law"})
THRESHOLD = 0.5  # a category is true when its score reaches this


@dataclass
class ModerationResult:
    """`category_scores` in [0, 1] for every category; `categories` the booleans; `flagged`
    true when a non-advice category (or an advice one, when `flag_advice`) is true. `guard`
    names the guard that decided ("lexical", "llama-guard", "self-check", or a "+" of them);
    `seconds` how long the check took."""

    category_scores: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    guard: str = ""
    seconds: float = 0.0
    flag_advice: bool = False
    threshold: float = THRESHOLD

    @property
    def categories(self) -> dict[str, bool]:
        return {c: self.category_scores.get(c, 0.0) >= self.threshold for c in CATEGORIES}

    @property
    def flagged(self) -> bool:
        return any(v and (self.flag_advice or c not in ADVICE) for c, v in self.categories.items())

    @property
    def flagged_categories(self) -> list[str]:
        """The categories that flag, in CATEGORIES' order (what a notice names)."""
        cats = self.categories
        return [c for c in CATEGORIES if cats[c] and (self.flag_advice or c not in ADVICE)]

    def merge(self, other: ModerationResult) -> ModerationResult:
        """The worse of two results, category by category (chunks of one text, or two guards);
        `guard` names those whose scores count, `seconds` adds up."""
        scores = {c: max(self.category_scores.get(c, 0.0), other.category_scores.get(c, 0.0))
                  for c in CATEGORIES}  # fmt: skip
        guards = [g for g in (self.guard, other.guard) if g]
        guard = "+".join(dict.fromkeys("+".join(guards).split("+"))) if guards else ""
        return ModerationResult(scores, guard, self.seconds + other.seconds,
                                self.flag_advice or other.flag_advice, self.threshold)  # fmt: skip

    def to_json(self) -> dict:
        """The one JSON form: OpenAI's and Mistral's result fields plus mixchat's."""
        return {
            "flagged": self.flagged,
            "categories": self.categories,
            "category_scores": {c: round(self.category_scores.get(c, 0.0), 4) for c in CATEGORIES},
            "guard": self.guard,
            "seconds": round(self.seconds, 6),
        }

    def notice(self) -> str:
        """One line naming what flagged ("" when nothing did)."""
        cats = self.flagged_categories
        return f"flagged: {', '.join(cats)} (by {self.guard})" if cats else ""


def scores(**values: float) -> dict[str, float]:
    """Every category at 0.0 except those named."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    unknown = set(values) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown moderation categories: {sorted(unknown)}")
    out.update(values)
    return out
