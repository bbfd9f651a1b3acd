"""Prompt text to token ids: the one place prompts are built, with the model's chat template when
it has one, so lens runs, steering-vector building and steering evaluation see the same ids.

An A/B prompt (`ab_prompt`) ends right before the answer letter: building a vector reads the
activation at that letter (`with_answer`), evaluating scores the letters at the position before
it, and both come from this one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.datasets import ABItem

ANSWER_OPEN = "("  # the assistant's answer starts "(", so the next token is the letter


def render_prompt(tokenizer, text: str, chat_template: bool = True) -> str:
    """The exact string the model sees: a single user turn plus the assistant header when the
    tokenizer has a chat template and `chat_template` is on, else `text` unchanged."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    return text


def encode_prompt(tokenizer, text: str, chat_template: bool = True) -> list[int]:
    rendered = render_prompt(tokenizer, text, chat_template)
    templated = rendered is not text
    # A rendered template already holds its special tokens; plain text gets the tokenizer's own (BOS).
    return tokenizer(rendered, add_special_tokens=not templated).input_ids


def special_ids(tokenizer, hf_config) -> tuple[tuple[int, ...], int]:
    """(end-of-sequence ids, padding id) from the tokenizer and the model config."""
    eos = set()
    for source in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(source)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = min(eos) if eos else 0
    return tuple(sorted(eos)), int(pad)


def letter_id(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens for this tokenizer; need exactly 1")
    return ids[0]


@dataclass(frozen=True)
class ABPrompt:
    """`prefix` ends right before the answer letter; `letters` maps each choice to its id."""

    prefix: list[int]
    letters: dict[str, int]

    def with_answer(self, letter: str) -> list[int]:
        """The prefix plus that letter: its last position is the label position."""
        return [*self.prefix, self.letters[letter]]


def ab_prompt(tokenizer, item: ABItem, chat_template: bool = True) -> ABPrompt:
    rendered = render_prompt(tokenizer, item.question, chat_template)
    templated = rendered is not item.question
    prefix = tokenizer(rendered + ANSWER_OPEN, add_special_tokens=not templated).input_ids
    return ABPrompt(prefix, {letter: letter_id(tokenizer, letter) for letter in item.choices})
