"""Moderation and guardrails, offline: one result type (result.py), the guards (lexical.py,
llama_guard.py, self_check.py) and the policy that composes them (policy.py)."""

from .policy import Policy, check_text
from .result import ADVICE, CATEGORIES, ModerationResult

__all__ = ["ADVICE", "CATEGORIES", "ModerationResult", "Policy", "check_text"]
