"""Prompt cleaning and tokenization for umT5, as the official Wan ``HuggingfaceTokenizer(clean='whitespace')``."""

from __future__ import annotations

import html
import re

import ftfy
import torch

WHITESPACE_RUN = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Repair mojibake, undo (double) HTML escaping, and collapse whitespace runs to single spaces."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return WHITESPACE_RUN.sub(" ", text).strip()


class WanTokenizer:
    """Callable on a prompt or a list of prompts -> ``(ids [B, text_len] long, mask [B, text_len] long)``.

    Each prompt is cleaned, ends with EOS, is truncated to ``text_len`` tokens and padded to exactly ``text_len``.
    """

    def __init__(self, hf_tokenizer, text_len: int = 512):
        self.hf_tokenizer = hf_tokenizer
        self.text_len = text_len

    def __call__(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = self.hf_tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return encoded["input_ids"].long(), encoded["attention_mask"].long()
