"""System prompts shared by the chat app and `mixchat ask`: the safe-mode guardrail, the
reply-language instruction, and their order. Pure text, no UI."""

from __future__ import annotations

from app.i18n import REPLY_LANGUAGES

# Mistral's documented guardrail system prompt ("safe_prompt"), word for word.
SAFE_MODE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. "
    "Ensure replies promote fairness and positivity."
)


def reply_language_instruction(language_code: str) -> str:
    """The instruction that asks for replies in a language; "" for none or an unknown code."""
    if language_code not in REPLY_LANGUAGES:
        return ""
    english_name, native_name = REPLY_LANGUAGES[language_code]
    return (
        f"Always answer in {english_name} ({native_name}), "
        "whatever the language of the user's message."
    )


def system_prompt(safe_mode: bool = False, system: str = "", reply_language: str = "") -> str:
    """Safe-mode guardrail, then the user's own system prompt, then the language instruction,
    separated by blank lines; "" when there is none of them."""
    parts = [
        SAFE_MODE_PROMPT if safe_mode else "",
        system.strip(),
        reply_language_instruction(reply_language),
    ]
    return "\n\n".join(part for part in parts if part)
