"""MileBench: multi-image prompts, scoring, and the model adapter the predictor calls.

Three parts, each usable alone:

1. **Prompts** (pure). `build_milebench_question` follows the reference harness
   (MileBench/MileBench ``utils.py``): instruction + "\\n" + context, each ``{image#k}`` (or
   ``{table#k}``) replaced by the model's image token, the choice list appended for multi-choice
   tasks (``\\nChoice list: \\nA. ...\\nYour answer is: ``). The instruction is kept whole; the rest
   is truncated from the LEFT so that instruction + context fit ``token_budget``, each image
   costing ``tokens_per_image`` tokens. An image whose placeholder falls in the cut part is dropped.
   Differences from the reference, on purpose: the text fragment that crosses the budget is cut
   at token level (the reference keeps it only when nothing else fits), and images listed in
   ``images_path`` without a placeholder are put first (so they are the first to be cut) instead
   of being passed without a placeholder.

2. **Scores** (pure). Open-ended tasks: ROUGE-L F (LCS over lower-cased word tokens after the
   reference's answer normalisation; implemented here, no dependency; ``beta=1`` gives the usual
   F1 of LCS precision and recall). Multi-choice: accuracy by option matching (an option letter,
   "A. text", or an option's text found in the prediction). Needle tasks (name contains "Needle"):
   the normalised answer is one of the prediction's tokens; MMCoQA: the answer is a substring of
   the prediction (both as the reference scores them). Items are aggregated per task, per
   image-quantity level (few < 6, medium 6-31, many > 31 images), per task group (Realistic
   Temporal / Realistic Semantic / Diagnostic, "Other" for unknown tasks) and overall (groups and
   overall are means of task scores). Error rows are excluded and counted. The reference computes
   ROUGE-L with the `rouge` package, which differs in details (tokenisation, sentence splitting), so
   open-ended scores can differ slightly from its numbers.

3. **The model adapter.** `MileBenchModel` has the reference harness's interface,
   ``forward(questions, image_paths, device, gen_kwargs) -> list[str]``, plus what our predictor
   needs to build prompts (token counting, left truncation) and, optionally, ``score_yes_no`` for
   POPE's one-forward scoring. `LlavaModel` implements it for any llava-hf folder (plus an
   optional LoRA adapter, merged). To evaluate another model, subclass `MileBenchModel` and pass
   the class (or ``"module:Class"``) as ``run_eval(..., model_adapter=...)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from orchestrator.eval.pope import strip_special_tokens
from orchestrator.model.adapter import find_adapter

# ----------------------------------------------------------------------------------------------
# Task taxonomy (MileBench's score.py); names are matched case- and punctuation-insensitively,
# so "action_localization" and "ActionLocalization" are the same task.

TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "Realistic Temporal": (
        "action_localization", "action_prediction", "action_sequence", "character_order",
        "counterfactual_inference", "egocentric_navigation", "moving_attribute", "moving_direction",
        "object_existence", "object_interaction", "object_shuffle", "scene_transition", "state_change",
    ),
    "Realistic Semantic": (
        "ALFRED", "CLEVR-Change", "DocVQA", "IEdit", "MMCoQA", "MultiModalQA", "nuscenes", "OCR-VQA",
        "SlideVQA", "Spot-the-Diff", "TQA", "WebQA", "WikiVQA",
    ),
    "Diagnostic": ("GPR1200", "ImageNeedleInAHaystack", "TextNeedleInAHaystack"),
}
GROUP_ORDER = ("Realistic Temporal", "Realistic Semantic", "Diagnostic", "Other")
LEVEL_ORDER = ("few", "medium", "many")


def _task_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


_GROUP_OF = {_task_key(task): group for group, tasks in TASK_GROUPS.items() for task in tasks}


def task_group(task: str) -> str:
    """MileBench's group of a task ("Realistic Temporal", "Realistic Semantic", "Diagnostic"), else "Other"."""
    return _GROUP_OF.get(_task_key(task), "Other")


def is_needle_task(task: str) -> bool:
    return "needle" in str(task).lower()


# ----------------------------------------------------------------------------------------------
# Prompts

PLACEHOLDER = re.compile(r"\{(?:image|table)#(\d+)\}")
IMAGE_TOKEN = "<image>"


def choice_text(choices: Sequence[str], task: str = "") -> str:
    """The reference's choice list suffix (GPR1200's 50+ options go without letters)."""
    if not choices:
        return ""
    letters = _task_key(task) != "gpr1200"
    lines = [(f"{chr(65 + index)}. " if letters else "") + str(choice) for index, choice in enumerate(choices)]
    return "\nChoice list: \n" + "\n".join(lines) + "\nYour answer is: "


def context_segments(context: str, n_images: int) -> list[tuple[str, object]]:
    """Split a context into ("text", str) and ("image", index into images_path) segments.

    ``{image#k}`` / ``{table#k}`` is image k-1. Images that no placeholder names come first.
    """
    segments: list[tuple[str, object]] = []
    named: list[int] = []
    position = 0
    for match in PLACEHOLDER.finditer(context):
        if match.start() > position:
            segments.append(("text", context[position:match.start()]))
        index = int(match.group(1)) - 1
        if not 0 <= index < n_images:
            raise ValueError(f"placeholder {match.group(0)} but only {n_images} images")
        segments.append(("image", index))
        named.append(index)
        position = match.end()
    if position < len(context):
        segments.append(("text", context[position:]))
    unnamed = [("image", index) for index in range(n_images) if index not in named]
    return unnamed + segments


@dataclass(frozen=True)
class MileBenchPrompt:
    question: str               # instruction + "\n" + kept context, images as the image token
    images: list[str]           # the kept images, in placeholder order
    context_tokens: int         # what the kept instruction + context cost (images at tokens_per_image)
    dropped_images: int
    truncated: bool


def build_milebench_question(
    instruction: str, context: str, images: Sequence[str], choices: Sequence[str] = (), *,
    count_tokens: Callable[[str], int], keep_last_tokens: Callable[[str, int], str],
    tokens_per_image: int, token_budget: int, image_token: str = IMAGE_TOKEN, task: str = "",
) -> MileBenchPrompt:
    """Instruction + "\\n" + context (+ choice list), left-truncated to `token_budget` tokens.

    `count_tokens(text)` counts a text's tokens (no special tokens); `keep_last_tokens(text, n)`
    returns the text of its last n tokens. The instruction is never cut; the context (choice list
    included, at its end) gets ``token_budget - count_tokens(instruction)``, walking from its end:
    text fragments cost their tokens, images `tokens_per_image`; the fragment that crosses the
    budget is cut to fit; an image that does not fit ends the walk (it and all before it dropped).
    """
    instruction = instruction or ""
    full = (context or "") + choice_text(list(choices), task)
    segments = context_segments(full, len(images))
    remaining = token_budget - count_tokens(instruction)
    kept: list[tuple[str, object]] = []
    used = 0
    truncated = False
    for kind, value in reversed(segments):
        if kind == "text":
            cost = count_tokens(value)
            if used + cost <= remaining:
                kept.append((kind, value))
                used += cost
                continue
            room = remaining - used
            if room > 0:
                piece = keep_last_tokens(value, room)
                kept.append((kind, piece))
                used += count_tokens(piece)
            truncated = True
            break
        if used + tokens_per_image > remaining:
            truncated = True
            break
        kept.append((kind, value))
        used += tokens_per_image
    kept.reverse()
    kept_images = [images[value] for kind, value in kept if kind == "image"]
    body = "".join(value if kind == "text" else image_token for kind, value in kept)
    question = f"{instruction}\n{body}" if instruction else body
    return MileBenchPrompt(
        question=question, images=list(kept_images),
        context_tokens=count_tokens(instruction) + used,
        dropped_images=len(images) - len(kept_images), truncated=truncated,
    )


def image_budget_batches(image_counts: Sequence[int], image_budget: int, max_items: int) -> list[list[int]]:
    """Consecutive groups of item indices with at most `image_budget` images and `max_items` items.

    An item with more images than the budget gets a group of its own (never dropped).
    """
    groups: list[list[int]] = []
    current: list[int] = []
    images = 0
    for index, count in enumerate(image_counts):
        if current and (images + count > image_budget or len(current) >= max_items):
            groups.append(current)
            current, images = [], 0
        current.append(index)
        images += count
    if current:
        groups.append(current)
    return groups


# ----------------------------------------------------------------------------------------------
# Scores

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_TOKEN = re.compile(r"\w+")


def normalize_answer(text: str | None) -> str:
    """The reference's answer normalisation: punctuation handling, periods dropped, lower case.

    A punctuation mark next to a space (or any mark in a text with a 1,000-style number) is
    removed, otherwise replaced by a space; periods not followed by a digit are removed.
    """
    text = strip_special_tokens(text).replace("\n", " ").replace("\t", " ").strip()
    out = text
    number = _COMMA_IN_NUMBER.search(text) is not None
    for mark in _PUNCT:
        if (mark + " " in text or " " + mark in text) or number:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD.sub("", out)
    return out.strip("'").strip('"').strip().lower()


def word_tokens(text: str | None) -> list[str]:
    """Lower-case word tokens (split on whitespace and punctuation) of a normalised answer."""
    return _TOKEN.findall(normalize_answer(text))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str | None, reference: str | None, beta: float = 1.0) -> dict:
    """ROUGE-L precision, recall and F-measure of a prediction against one reference.

    P = LCS / len(prediction tokens), R = LCS / len(reference tokens),
    F = (1 + beta^2) P R / (R + beta^2 P); 0 when either side has no tokens.
    """
    pred, ref = word_tokens(prediction), word_tokens(reference)
    lcs = lcs_length(pred, ref)
    if not lcs:
        return {"p": 0.0, "r": 0.0, "f": 0.0}
    p, r = lcs / len(pred), lcs / len(ref)
    return {"p": p, "r": r, "f": (1 + beta ** 2) * p * r / (r + beta ** 2 * p)}


def rouge_l_f(prediction: str | None, reference: str | None) -> float:
    return rouge_l(prediction, reference)["f"]


_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:[.:)]|\s*$))")
_ANSWER_IS = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])")


def match_choice(prediction: str | None, choices: Sequence[str]) -> int | None:
    """Index of the option a prediction picks, or None.

    In order: a leading letter ("B", "(B)", "B. ..."), a letter followed by its option's text
    ("b red car"), the option text itself found in the prediction (spaces ignored; the earliest
    match, the longest on ties), "the answer is B".
    """
    raw = strip_special_tokens(prediction)
    if not raw or not choices:
        return None
    n_letters = min(len(choices), 26)
    match = _LEADING_LETTER.match(raw)
    if match:
        index = ord(match.group(1) or match.group(2)) - 65
        if index < n_letters:
            return index
    text = normalize_answer(raw)
    best: tuple[int, int, int] | None = None  # (position, -length, index)
    for index in range(n_letters):
        needle = normalize_answer(f"{chr(65 + index)} {choices[index]}")
        position = text.find(needle) if needle else -1
        if position >= 0 and (position == 0 or not text[position - 1].isalnum()):
            candidate = (position, -len(needle), index)
            best = candidate if best is None or candidate < best else best
    if best is not None:
        return best[2]
    squashed = text.replace(" ", "")
    for index, choice in enumerate(choices):
        needle = normalize_answer(str(choice)).replace(" ", "")
        position = squashed.find(needle) if needle else -1
        if position >= 0:
            candidate = (position, -len(needle), index)
            best = candidate if best is None or candidate < best else best
    if best is not None:
        return best[2]
    match = _ANSWER_IS.search(raw)
    if match and ord(match.group(1)) - 65 < n_letters:
        return ord(match.group(1)) - 65
    return None


def gold_choice(response: str, choices: Sequence[str]) -> int | None:
    """Index of the correct option: the response is an option's text, or an option letter."""
    response = str(response).strip()
    for index, choice in enumerate(choices):
        if str(choice).strip() == response:
            return index
    normalized = normalize_answer(response)
    for index, choice in enumerate(choices):
        if normalize_answer(str(choice)) == normalized:
            return index
    if len(response) == 1 and response.upper().isalpha():
        index = ord(response.upper()) - 65
        if index < len(choices):
            return index
    return None


def score_sample(task: str, question_type: str, prediction: str | None, response: str,
                 choices: Sequence[str] = ()) -> tuple[str, float]:
    """(metric name, score in [0, 1]) of one MileBench answer, by the reference's rules."""
    if is_needle_task(task):
        return "exact_match", float(normalize_answer(response) in normalize_answer(prediction).split())
    if _task_key(task) == "mmcoqa":
        return "exact_match", float(normalize_answer(response) in normalize_answer(prediction))
    if question_type == "multi-choice":
        gold = gold_choice(response, choices)
        if gold is None:
            return "accuracy", float(normalize_answer(prediction) == normalize_answer(response))
        return "accuracy", float(match_choice(prediction, choices) == gold)
    return "rouge_l_f", rouge_l_f(prediction, response)


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    return [str(item) for item in list(value)]


def score_answers(df: pd.DataFrame) -> pd.DataFrame:
    """MileBench answer rows with ``metric`` and ``score`` added (NaN score for error rows).

    Needs ``split`` (the task), ``question_type``, ``raw_answer``, ``label`` (the reference answer),
    ``choice_list``; ``error`` optional.
    """
    frame = df.copy()
    errors = frame["error"].fillna("").astype(str) if "error" in frame.columns else pd.Series([""] * len(frame))
    metrics, scores = [], []
    for row, error in zip(frame.itertuples(index=False), errors):
        metric, score = score_sample(row.split, row.question_type, row.raw_answer, row.label,
                                     _as_list(row.choice_list))
        metrics.append(metric)
        scores.append(score if error == "" else math.nan)
    frame["metric"] = metrics
    frame["score"] = scores
    return frame


SUMMARY_COLUMNS = ("scope", "name", "metric", "value", "n", "n_errors")


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Long table of MileBench scores: one row per (scope, name, metric).

    scope "task" (mean item score of each task, its own metric), "task_level" (task/level),
    "level" (mean item score over all tasks at a level), "group" and "overall" (means of task
    scores; metric "score"). Values are fractions in [0, 1].
    """
    if df is None or len(df) == 0:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    scored = df if "score" in df.columns else score_answers(df)
    scored = scored.copy()
    scored["error"] = scored["error"].fillna("").astype(str) if "error" in scored.columns else ""
    scored["level"] = scored["image_quantity_level"].fillna("").astype(str).str.lower()
    rows = []
    task_scores: dict[str, float] = {}
    for task in sorted(scored["split"].astype(str).unique(), key=lambda t: (GROUP_ORDER.index(task_group(t)), t)):
        part = scored[scored["split"].astype(str) == task]
        ok = part[part["error"] == ""]
        metric = part["metric"].iloc[0]
        value = float(ok["score"].mean()) if len(ok) else math.nan
        task_scores[task] = value
        rows.append({"scope": "task", "name": task, "metric": metric, "value": value, "n": len(ok),
                     "n_errors": int((part["error"] != "").sum())})
        for level in sorted(part["level"].unique(), key=lambda l: LEVEL_ORDER.index(l) if l in LEVEL_ORDER else 9):
            cell = ok[ok["level"] == level]
            rows.append({"scope": "task_level", "name": f"{task}/{level}", "metric": metric,
                         "value": float(cell["score"].mean()) if len(cell) else math.nan, "n": len(cell),
                         "n_errors": int(((part["level"] == level) & (part["error"] != "")).sum())})
    ok = scored[scored["error"] == ""]
    for level in LEVEL_ORDER:
        cell = ok[ok["level"] == level]
        if len(cell) or (scored["level"] == level).any():
            rows.append({"scope": "level", "name": level, "metric": "score",
                         "value": float(cell["score"].mean()) if len(cell) else math.nan, "n": len(cell),
                         "n_errors": int(((scored["level"] == level) & (scored["error"] != "")).sum())})
    for group in GROUP_ORDER:
        tasks = [task for task in task_scores if task_group(task) == group]
        if not tasks:
            continue
        values = [task_scores[task] for task in tasks if not math.isnan(task_scores[task])]
        rows.append({"scope": "group", "name": group, "metric": "score",
                     "value": sum(values) / len(values) if values else math.nan, "n": len(tasks),
                     "n_errors": int(scored["split"].astype(str).isin(tasks).mul(scored["error"] != "").sum())})
    values = [value for value in task_scores.values() if not math.isnan(value)]
    rows.append({"scope": "overall", "name": "all tasks", "metric": "score",
                 "value": sum(values) / len(values) if values else math.nan, "n": len(task_scores),
                 "n_errors": int((scored["error"] != "").sum())})
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


# ----------------------------------------------------------------------------------------------
# Batching helper shared by model adapters


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int):
    """input_ids, attention_mask and position_ids (torch, long) for left-padded sequences.

    Positions count only real tokens (0 at each sequence's first token), so a padded row sees the
    same positions, and thus gives the same logits, as the same sequence alone.
    """
    import torch

    if not sequences:
        raise ValueError("no sequences to pad")
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            input_ids[row, width - len(sequence):] = torch.as_tensor(list(sequence), dtype=torch.long)
            attention_mask[row, width - len(sequence):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def open_image(path: str):
    """An RGB PIL image; raises OSError/FileNotFoundError with the path on failure.

    Uses the data stage's `load_image` when it exists, so the whole pipeline opens images alike.
    """
    try:
        from orchestrator.data.datasets import load_image  # type: ignore
    except ImportError:
        load_image = None
    if load_image is not None:
        return load_image(path)
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Model adapters


class MileBenchModel:
    """The reference harness's model interface: ``init_components(config)`` and ``forward``.

    Subclasses set `tokens_per_image`, `image_token` and `max_length` in `init_components` and
    implement `forward`; `score_yes_no` is optional (POPE's score mode needs it). The default
    token counting splits on whitespace; override `count_tokens` / `keep_last_tokens` with the
    model's tokenizer for exact budgets.
    """

    name = "model"
    image_token = IMAGE_TOKEN
    tokens_per_image = 1
    max_length: int | None = None
    device = "cpu"

    def __init__(self, config: dict):
        self.config = dict(config)
        self.init_components(self.config)

    def init_components(self, config: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def keep_last_tokens(self, text: str, n: int) -> str:
        return " ".join(text.split()[-n:]) if n > 0 else ""

    def prompt_length(self, question: str, n_images: int) -> int:
        """Tokens of the full prompt the model will see (images expanded)."""
        return self.count_tokens(question) + n_images * self.tokens_per_image

    def load_images(self, paths: Sequence[str]):
        return [open_image(path) for path in paths]

    def forward(self, questions: list[str], image_paths: list[list[str]], device=None,
                gen_kwargs: dict | None = None, images: list[list] | None = None) -> list[str]:
        raise NotImplementedError

    def score_yes_no(self, questions: list[str], image_paths: list[list[str]],
                     images: list[list] | None = None) -> list[float]:
        raise NotImplementedError(f"{type(self).__name__} cannot score yes/no; use eval.mode=generate")


class LlavaModel(MileBenchModel):
    """Any llava-hf folder (tiny or LLaVA-1.5-7B), optionally with a LoRA adapter merged in.

    config: ``model_path``, ``adapter_path`` (optional), ``dtype`` ("auto" = bf16 on GPU, fp32 on
    CPU), ``attn_implementation``, ``template`` (``llava_v1`` for evaluation), ``device``.
    Batches are left-padded with an attention mask and real-token position ids, so an answer does
    not depend on what else is in its batch.
    """

    name = "llava"

    def init_components(self, config: dict) -> None:
        import torch

        from orchestrator.model.llava import load_llava

        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.template = config.get("template", "llava_v1")
        self.loaded = load_llava(config["model_path"], dtype=config.get("dtype", "auto"), device=self.device,
                                 attn_implementation=config.get("attn_implementation", "sdpa"))
        model = self.loaded.model
        if config.get("adapter_path"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(find_adapter(config["adapter_path"])))
            model = model.merge_and_unload()
        self.model = model.eval()
        self.tokenizer = self.loaded.tokenizer
        self.tokens_per_image = self.loaded.tokens_per_image
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.loaded.image_token_id)
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 0)) or None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._yes_no: tuple[int, int] | None = None

    # token counting for prompt budgets
    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self._ids(text)) if text else 0

    def keep_last_tokens(self, text: str, n: int) -> str:
        if n <= 0:
            return ""
        ids = self._ids(text)
        return text if len(ids) <= n else self.tokenizer.decode(ids[-n:], skip_special_tokens=False)

    def prompt_ids(self, question: str, n_images: int) -> list[int]:
        from orchestrator.model.templates import build_prompt, encode_prompt

        prompt = build_prompt(question, self.template, num_images=n_images)
        ids = encode_prompt(self.tokenizer, prompt, self.loaded.image_token_id, self.tokens_per_image)
        found = sum(1 for token in ids if token == self.loaded.image_token_id)
        if found != n_images * self.tokens_per_image:
            raise ValueError(f"prompt holds {found // max(self.tokens_per_image, 1)} image tokens "
                             f"but {n_images} images were given")
        return ids

    def prompt_length(self, question: str, n_images: int) -> int:
        return len(self.prompt_ids(question, n_images))

    def _inputs(self, questions, image_paths, images):
        from orchestrator.model.llava import pixel_values

        if images is None:
            images = [self.load_images(paths) for paths in image_paths]
        ids = [self.prompt_ids(question, len(item_images)) for question, item_images in zip(questions, images)]
        input_ids, attention_mask, position_ids = left_pad(ids, self.pad_id)
        flat = [image for item_images in images for image in item_images]
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                  "position_ids": position_ids.to(self.device)}
        if flat:
            dtype = next(self.model.parameters()).dtype
            inputs["pixel_values"] = pixel_values(self.loaded, flat).to(self.device, dtype)
        return inputs

    def forward(self, questions: list[str], image_paths: list[list[str]], device=None,
                gen_kwargs: dict | None = None, images: list[list] | None = None) -> list[str]:
        """Greedy answers (special tokens stripped) for a batch of questions with their images."""
        import torch

        inputs = self._inputs(questions, image_paths, images)
        kwargs = {"max_new_tokens": 128, "do_sample": False, "num_beams": 1}
        kwargs.update(gen_kwargs or {})
        with torch.inference_mode():
            output = self.model.generate(**inputs, pad_token_id=self.pad_id,
                                         eos_token_id=self.tokenizer.eos_token_id, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [strip_special_tokens(text) for text in texts]

    def yes_no_ids(self) -> tuple[int, int]:
        """Token ids of "Yes" and "No" as the first answer token (LLaMA: "▁Yes", "▁No")."""
        if self._yes_no is None:
            ids = []
            for word in ("Yes", "No"):
                pieces = self._ids(word)
                if not pieces or pieces[0] == self.tokenizer.unk_token_id:
                    raise ValueError(f"the tokenizer has no token for {word!r}; score mode needs one")
                ids.append(pieces[0])
            if ids[0] == ids[1]:
                raise ValueError("'Yes' and 'No' map to the same token; score mode cannot tell them apart")
            self._yes_no = (ids[0], ids[1])
        return self._yes_no

    def score_yes_no(self, questions: list[str], image_paths: list[list[str]],
                     images: list[list] | None = None) -> list[float]:
        """p(yes) = softmax over the "Yes"/"No" logits at the last prompt position (one forward)."""
        import torch

        yes, no = self.yes_no_ids()
        inputs = self._inputs(questions, image_paths, images)
        with torch.inference_mode():
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :]
        pair = logits[:, [yes, no]].float()
        return torch.softmax(pair, dim=-1)[:, 0].tolist()


def load_model_adapter(spec) -> type[MileBenchModel]:
    """A model adapter class from a class, or a ``"package.module:ClassName"`` string."""
    if spec is None:
        return LlavaModel
    if isinstance(spec, type):
        return spec
    module_name, _, class_name = str(spec).partition(":")
    if not class_name:
        raise ValueError(f"model adapter {spec!r}: expected 'package.module:ClassName'")
    import importlib

    return getattr(importlib.import_module(module_name), class_name)
