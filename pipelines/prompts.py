"""Prompt text to token ids: the one place prompts are built, with the model's chat template when
it has one, so lens runs, steering-vector building and steering evaluation see the same ids.

A choice prompt (`choice_prompt`) ends right before the label token of a dataset item's answer:
building a vector reads the activation at that label (`with_answer`), evaluating scores the
labels at the position before it, and both come from this one function. The label token is per
format (see pipelines.datasets): for lettered choices (`ab`, `choices`) the answer opens "(" so
the next token is the letter; for `yes_no` it is the first token of the answer word as the
tokenizer splits it right after the assistant turn opens (" Yes" unless the prompt ends in
whitespace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.datasets import Item

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


def _name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def one_token(tokenizer, text, what: str) -> int:
    """The one token `text` is (a trace's target or foil, a patch run's target); else refused
    naming `what` (e.g. "pairs.jsonl:3: field 'target'")."""
    tokens = tokenizer(text, add_special_tokens=False).input_ids if isinstance(text, str) and text else []
    if len(tokens) != 1:
        raise ValueError(
            f"{what}={text!r} is {len(tokens)} tokens, not one: give text that is one token of this tokenizer "
            "(often with its leading space, e.g. ' Paris')"
        )
    return tokens[0]


def _letter_id(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens for this tokenizer; need exactly 1")
    return ids[0]


def _word_ids(tokenizer, rendered: str, add_special: bool, item: Item) -> tuple[list[int], list[int]]:
    """(prefix, label ids) for answer words: each label id is the first token the tokenizer gives
    the word when it follows the rendered prompt (with a leading space unless the prompt ends
    in whitespace), checked to leave the prompt's own tokens unchanged."""
    prefix = tokenizer(rendered, add_special_tokens=add_special).input_ids
    space = "" if rendered[-1:].isspace() else " "
    ids = []
    for word in item.labels:
        full = tokenizer(rendered + space + word, add_special_tokens=add_special).input_ids
        if full[: len(prefix)] != prefix or len(full) == len(prefix):
            raise ValueError(
                f"{item.where}: tokenizer {_name(tokenizer)} does not keep the prompt's tokens when the answer {space + word!r} follows (it re-splits across the boundary), so the answer has no label token of its own"
            )
        ids.append(full[len(prefix)])
    return prefix, ids


@dataclass(frozen=True)
class ChoicePrompt:
    """`prefix` ends right before the label token; `label_ids[i]` is the token of the item's
    `labels[i]` at that position (one per label, all distinct)."""

    prefix: list[int]
    label_ids: tuple[int, ...]

    def with_answer(self, choice: int) -> list[int]:
        """The prefix plus the label token of answer `choice`: its last position is the label position."""
        return [*self.prefix, self.label_ids[choice]]


def choice_prompt(tokenizer, item: Item, chat_template: bool = True) -> ChoicePrompt:
    """The item's prompt up to its label token, and the label tokens, for any dataset format."""
    rendered = render_prompt(tokenizer, item.question, chat_template)
    templated = rendered is not item.question
    if item.format == "yes_no":
        prefix, ids = _word_ids(tokenizer, rendered, not templated, item)
    else:  # lettered choices: the answer opens "(" and the next token is the letter
        prefix = tokenizer(rendered + ANSWER_OPEN, add_special_tokens=not templated).input_ids
        ids = [_letter_id(tokenizer, label) for label in item.labels]
    if len(set(ids)) != len(ids):
        shown = {label: i for label, i in zip(item.labels, ids)}
        raise ValueError(
            f"{item.where}: tokenizer {_name(tokenizer)} gives the answers {list(item.labels)} the same first token ({shown}); they cannot be scored apart"
        )
    return ChoicePrompt(prefix, tuple(ids))
