"""LLaVA-1.5 conversation templates and label masking, shared by training and evaluation.

`v1` (HA-DPO training) and `llava_v1` (POPE evaluation) differ only in the system prompt. A single-turn
example is ``{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>``. Only the answer's tokens and
its ``</s>`` carry labels; the system prompt, the question and the image positions carry -100.

Prompt and answer are tokenized separately and concatenated, so the prompt's ids are identical for the
chosen and the rejected answer (DPO relies on that) and the label boundary is exact for both our
word-level tokenizer and LLaMA's SentencePiece one (which gives "Yes" alone the same "▁Yes" piece it
gets after "ASSISTANT:").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

IMAGE_PLACEHOLDER = "<image>"
CHAT_TEMPLATE = "chat"  # the template name that means "the model's own chat template" (families.py)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str
    user: str = "USER"
    assistant: str = "ASSISTANT"


TEMPLATES = {
    "v1": ConversationTemplate(
        "v1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ),
    "llava_v1": ConversationTemplate(
        "llava_v1",
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    ),
}


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}") from None


def build_prompt(question: str, template: str = "v1", num_images: int = 1) -> str:
    """The text up to and including ``ASSISTANT:`` for one user turn with `num_images` images.

    A question that already holds ``<image>`` placeholders (MileBench contexts) is used as it is.
    """
    conv = get_template(template)
    if IMAGE_PLACEHOLDER not in question and num_images:
        question = (IMAGE_PLACEHOLDER + "\n") * num_images + question
    return f"{conv.system} {conv.user}: {question} {conv.assistant}:"


def template_words(template: str) -> list[str]:
    """Every word the template adds around a turn (a word-level tokenizer needs them in its vocabulary)."""
    return build_prompt("", template, num_images=0).split()


def expand_image_tokens(ids: list[int], image_token_id: int, tokens_per_image: int | Sequence[int]) -> list[int]:
    """Repeat each image token id `tokens_per_image` times (llava-hf models expect the expanded form); a
    sequence gives each image its own count, in order (LLaVA-NeXT's anyres tiles, Qwen2.5-VL's patches), and
    must name exactly as many images as `ids` holds."""
    counts = [tokens_per_image] * ids.count(image_token_id) if isinstance(tokens_per_image, int) \
        else list(tokens_per_image)
    found = ids.count(image_token_id)
    if found != len(counts):
        raise ValueError(f"prompt holds {found} image placeholders but {len(counts)} images were given")
    remaining = iter(counts)
    out: list[int] = []
    for token in ids:
        out.extend([token] * next(remaining) if token == image_token_id else [token])
    return out


def encode_prompt(tokenizer, prompt: str, image_token_id: int, tokens_per_image: int) -> list[int]:
    """Token ids of a prompt with BOS and the image tokens expanded."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return expand_image_tokens(list(ids), image_token_id, tokens_per_image)


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer followed by ``</s>`` (the answer's end of sequence carries a label)."""
    ids = list(tokenizer(answer.strip(), add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id]


def encode_example(tokenizer, prompt_ids: list[int], answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """input_ids and labels for prompt + answer; labels are -100 on the prompt.

    Truncation cuts the answer's end, never the prompt (the image tokens must stay whole); a prompt
    longer than `max_length` is an error rather than a silently broken example.
    """
    if len(prompt_ids) >= max_length:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_length {max_length}")
    answer_ids = encode_answer(tokenizer, answer)[: max_length - len(prompt_ids)]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids
