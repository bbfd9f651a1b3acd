"""Prompt text to token ids: the one place prompts are built, with the model's chat template
when it has one (so lens runs and, later, steering build and evaluate prompts identically)."""

from __future__ import annotations


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
