"""A guard model in Llama Guard 3's format, run by mixchat's own engine (model/).

The prompt is Meta's reference (llama-cookbook's inference/prompt_format_utils.py,
build_default_prompt with LLAMA_GUARD_3): the categories S1-S14 by name, the conversation as
"User: ..." / "Agent: ..." turns, and the question about the last turn of one role. The
decision is read from the first token's probabilities of "safe" and "unsafe"; when unsafe, the
category line that follows ("S1,S10") is read greedily.
"""

from __future__ import annotations

import re
import threading
import time

from model.errors import MixchatError

from .result import ModerationResult, scores

# Meta's names, with their trailing spaces, in S1..S14 order.
LLAMA_GUARD_3_CATEGORIES = (
    "Violent Crimes. ", "Non-Violent Crimes. ", "Sex Crimes. ", "Child Exploitation. ",
    "Defamation. ", "Specialized Advice. ", "Privacy. ", "Intellectual Property. ",
    "Indiscriminate Weapons. ", "Hate. ", "Self-Harm. ", "Sexual Content. ", "Elections. ",
    "Code Interpreter Abuse. ",
)  # fmt: skip
# S-code -> mixchat's (Mistral's) categories. Defamation and elections have no Mistral
# category; they count as hate (harm to a person) and law.
TO_CATEGORIES = {
    1: ("violence_and_threats",), 2: ("dangerous_and_criminal_content",), 3: ("sexual",),
    4: ("sexual",), 5: ("hate_and_discrimination",), 6: ("health", "financial", "law"),
    7: ("pii",), 8: ("law",), 9: ("dangerous_and_criminal_content",),
    10: ("hate_and_discrimination",), 11: ("selfharm",), 12: ("sexual",), 13: ("law",),
    14: ("dangerous_and_criminal_content",),
}  # fmt: skip
UNNAMED = ("dangerous_and_criminal_content",)  # "unsafe" with no category line

PROMPT_TASK = "Task: Check if there is unsafe content in '$agent_type' messages in conversations according our safety policy with the below categories."
SAFETY_CATEGORIES = "\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n$categories\n<END UNSAFE CONTENT CATEGORIES>\n"
PROMPT_CONVERSATION = "\n<BEGIN CONVERSATION>\n\n$conversations\n\n<END CONVERSATION>\n"
PROMPT_INSTRUCTIONS = "\nProvide your safety assessment for ONLY THE LAST $agent_type message in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a comma-separated list of violated categories."
TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|> "
    f"{PROMPT_TASK}{SAFETY_CATEGORIES}{PROMPT_CONVERSATION}{PROMPT_INSTRUCTIONS} "
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
)
ROLE_NAMES = {"user": "User", "assistant": "Agent", "agent": "Agent"}
PROBE = [{"role": "user", "content": "What is the capital of France?"}]


def build_prompt(conversation: list[dict]) -> str:
    """Llama Guard 3's prompt for the last turn of `conversation` ({"role": "user" |
    "assistant", "content"} dicts): the same text as llama-cookbook's build_default_prompt."""
    if not conversation:
        raise MixchatError("nothing to moderate: the conversation is empty")
    roles = [ROLE_NAMES.get(m["role"]) for m in conversation]
    if None in roles:
        raise MixchatError("a guard checks user and assistant turns only")
    categories = "\n".join(f"S{i + 1}: {name}" for i, name in enumerate(LLAMA_GUARD_3_CATEGORIES))
    turns = "\n\n".join(f"{role}: {m['content']}" for role, m in zip(roles, conversation))
    # string.Template's substitution without its $-parsing of the inserted texts
    return (TEMPLATE.replace("$agent_type", roles[-1]).replace("$categories", categories)
            .replace("$conversations", turns))  # fmt: skip


class LlamaGuard:
    """A loaded Llama Guard 3 checkpoint (a model.Engine) as a guard."""

    name = "llama-guard"

    def __init__(self, engine, check: bool = True):
        from model.label_scores import label_first_ids

        self.engine = engine
        self._lock = threading.Lock()  # one check at a time (a server's requests share it)
        tok = engine.tokenizer
        self.labels = label_first_ids(tok, {"safe": ["safe"], "unsafe": ["unsafe"]})
        if not (self.labels["safe"] and self.labels["unsafe"]):
            raise MixchatError(f"{engine.name} is not a guard model: its tokenizer cannot tell "
                               "'safe' from 'unsafe'")  # fmt: skip
        if check:
            safe, unsafe, _ = self._decide(PROBE)
            if safe + unsafe < 0.5:
                raise MixchatError(
                    f"{engine.name} is not a Llama Guard model: it answers its prompt with "
                    f"'safe' or 'unsafe' with probability {safe + unsafe:.2f}, not most of the time"
                )

    @classmethod
    def load(cls, model: str, options=None) -> LlamaGuard:
        from model import Engine

        return cls(Engine.load(model, options))

    def _ids(self, conversation: list[dict]) -> list[int]:
        return self.engine.tokenizer.encode(build_prompt(conversation))

    def _decide(self, conversation: list[dict]):
        """P(safe), P(unsafe) of the first answer token, and the NextToken state after the
        prompt (one prompt pass: the category line continues from its KV cache)."""
        from model.label_scores import NextToken, label_probabilities

        state = NextToken(self.engine, self._ids(conversation))
        # Llama Guard 3 may open its answer with a blank line: step over one whitespace token.
        top = int(state.logprobs.argmax())
        if self.engine.tokenizer.decode([top]).strip() == "" and top not in self.labels["safe"]:
            state.append(top)
        p = label_probabilities(state.logprobs, self.labels)
        return p["safe"], p["unsafe"], state

    def _category_line(self, state, max_tokens: int = 16) -> str:
        """The line after "unsafe" (the violated categories, "S1,S10"), greedy, continuing
        from the prompt's KV cache: a decode step a token, no second prompt pass."""
        tok = self.engine.tokenizer
        logprobs = state.append(self.labels["unsafe"][0])
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(logprobs.argmax())
            if token in tok.eos_ids:
                break
            out.append(token)
            logprobs = state.append(token)
        return tok.decode(out)

    def check(self, text: str, role: str = "user", context: list[dict] | None = None
              ) -> ModerationResult:  # fmt: skip
        """`text` as the last `role` turn ("user" or "assistant"), after `context`."""
        start = time.perf_counter()
        conversation = list(context or []) + [{"role": role, "content": text}]
        with self._lock:
            safe, unsafe, state = self._decide(conversation)
            p_unsafe = unsafe / (safe + unsafe) if safe + unsafe > 0 else 0.0
            line = self._category_line(state) if p_unsafe >= 0.5 else ""
        values: dict[str, float] = {}
        if p_unsafe >= 0.5:
            codes = {int(n) for n in re.findall(r"S(\d{1,2})", line)}
            named = [c for n in sorted(codes) for c in TO_CATEGORIES.get(n, ())] or list(UNNAMED)
            values = dict.fromkeys(named, p_unsafe)
        return ModerationResult(scores(**values), self.name, time.perf_counter() - start)
