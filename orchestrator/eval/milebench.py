"""MileBench: multi-image prompts and scoring (the model adapter that answers them: eval/model_adapter.py).

Parts 1 and 2 compute what MileBench's own code computes, odd parts included (github
MileBench/MileBench at 9583e1f: ``utils.py``, ``evaluate.py``, ``score.py``,
``workers/model_workers.py``; ROUGE-L as the ``rouge==1.0.1`` package it pins computes it).
docs/milebench.md lists each upstream behaviour and every known difference of the pipeline
around these functions; the functions themselves have none.

1. **Prompts** (pure). `build_milebench_question` is ``MileBenchDataset.__getitem__`` followed by
   the LLaVA worker's fix-up of adjacent images: instruction + "\\n" + context (+ the choice-list
   suffix when the sample has a ``choice_list``), the context left-truncated to a token budget
   walked fragment by fragment from its end, images handed to placeholders from the end of
   ``images_path`` whatever their ``{image#k}`` number. `llava_worker_prompt` and
   `LLAVA_WORKER_GEN_KWARGS` are the worker's conversation template and generation settings,
   which `model_adapter.VisionLanguageModel` uses for MileBench.

2. **Scores** (pure). `score_sample` is ``evaluate.py``'s ``Eval``: answers normalised by
   `normalize_answer` (``Eval.process``), open-ended tasks scored by ROUGE-L F (`rouge_l`, the
   pinned package's unique-word LCS), multi-choice tasks by `extract_choice`
   (``Eval.match_choice``), needle tasks and MMCoQA by token / substring match. `summarise`
   gives per-task scores (what ``score.py`` collects) and per-task image-quantity levels (what
   ``eval.json`` holds), plus cross-task levels, task groups and an overall mean that upstream
   does not compute (means of the above, documented in `summarise`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pandas as pd

from orchestrator.eval.items import as_list

# ----------------------------------------------------------------------------------------------
# Task taxonomy (score.py's dataset_list); names are matched case- and punctuation-insensitively,
# so the older "action_localization" spelling and score.py's "ActionLocalization" are one task.

TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "Realistic Temporal": (
        "ActionLocalization", "ActionPrediction", "ActionSequence", "CharacterOrder",
        "CounterfactualInference", "EgocentricNavigation", "MovingAttribute", "MovingDirection",
        "ObjectExistence", "ObjectInteraction", "ObjectShuffle", "SceneTransition", "StateChange",
    ),
    "Realistic Semantic": (
        "ALFRED", "CLEVR-Change", "DocVQA", "IEdit", "MMCoQA", "MultiModalQA", "nuscenes", "OCR-VQA",
        "SlideVQA", "Spot-the-Diff", "TQA", "WebQA", "WikiVQA",
    ),
    "Diagnostic": ("TextNeedleInAHaystack", "ImageNeedleInAHaystack", "GPR1200"),
}
GROUP_ORDER = ("Realistic Temporal", "Realistic Semantic", "Diagnostic", "Other")
LEVEL_ORDER = ("few", "medium", "many")


def _task_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


_GROUP_OF = {_task_key(task): group for group, tasks in TASK_GROUPS.items() for task in tasks}


def task_group(task: str) -> str:
    """MileBench's group of a task ("Realistic Temporal", "Realistic Semantic", "Diagnostic"), else "Other"."""
    return _GROUP_OF.get(_task_key(task), "Other")


# ----------------------------------------------------------------------------------------------
# Prompts: utils.py MileBenchDataset.__getitem__ and the LLaVA worker of workers/model_workers.py

PLACEHOLDER_TEXT = "<ImageHere>"  # utils.py's image placeholder; the model's image token replaces it last
IMAGE_TOKEN = "<image>"


def choice_text(choices: Sequence[str], task: str = "") -> str:
    """utils.py's choice-list suffix: "\\nChoice list: \\nA. x\\nB. y\\nYour answer is: ".

    Options are lettered chr(65 + i) ("[" after "Z"), except in the task named exactly "GPR1200"
    (its 50+ options go without letters). An empty list still gives the suffix, with no options.
    """
    lines = [(f"{chr(65 + index)}. " if task != "GPR1200" else "") + f"{choice}"
             for index, choice in enumerate(choices)]
    return "\nChoice list: \n" + "\n".join(lines) + "\nYour answer is: "


def separate_adjacent_images(question: str, placeholder: str = PLACEHOLDER_TEXT) -> str:
    """The LLaVA worker's fix-up ("special cases in CLEVR-Change"): each pair of adjacent
    placeholders, paired left to right, becomes placeholder "\\n" placeholder "\\n".

    Three in a row give "p\\np\\np"; four give "p\\np\\np\\np\\n" (``str.replace`` semantics).
    """
    return question.replace(placeholder + placeholder, placeholder + "\n" + placeholder + "\n")


@dataclass(frozen=True)
class MileBenchPrompt:
    question: str               # instruction + "\n" + kept context, images as the image token
    images: list[str]           # the kept images, in prompt order
    context_tokens: int         # what the kept instruction + context cost (images at tokens_per_image)
    dropped_images: int
    truncated: bool             # a text fragment was cut or left out


def build_milebench_question(
    instruction: str, context: str, images: Sequence[str], choices: Sequence[str] = (), *,
    count_tokens: Callable[[str], int], keep_last_tokens: Callable[[str, int], str],
    tokens_per_image: int, token_budget: int, image_token: str = IMAGE_TOKEN, task: str = "",
    has_choice_list: bool | None = None,
) -> MileBenchPrompt:
    """MileBench's question for one sample, as utils.py ``MileBenchDataset.__getitem__`` (images
    not combined) builds it and the LLaVA worker (``LLaVA.forward``) fixes it up.

    Step by step, as upstream (`token_budget` is its ``max_context_len``, `tokens_per_image` its
    ``n_tokens_per_image``):

    1. The choice-list suffix (`choice_text`) is appended to the context when the sample has a
       ``choice_list`` key, even an empty one (`has_choice_list`; None: when `choices` is non-empty).
    2. ``{image#k}`` and ``{table#k}`` for k = 1..len(images) become placeholders; other numbers
       stay as text. The number does not pick the image: images go to placeholders in
       ``images_path`` order counted from the end (the last image to the last placeholder).
    3. The context is split at the placeholders and walked from its end with ``token_budget -
       count_tokens(instruction)`` tokens. A text fragment that does not fit ends the walk, except
       the first one (the context's end), which is cut to its last tokens (``ids[-room:]``, Python's
       slice: all of them when room is 0). After each kept fragment one image is taken from the end
       of ``images_path`` while any remain; an image that does not fit ends the walk. So a context
       without placeholders gets one image (the last) in front of it, and surplus images are
       dropped from the front.
    4. Each kept fragment goes through the tokenizer and back: ``keep_last_tokens(text, n)`` must
       return ``decode(encode(text)[-n:])`` (also when n covers all of ``text``'s tokens: upstream
       decodes every fragment); ``count_tokens(text)`` is ``len(encode(text))``, without special tokens.
    5. question = instruction + "\\n" + the kept fragments joined by placeholders (one more in front
       when the walk's last step took an image); adjacent placeholders are separated
       (`separate_adjacent_images`); each placeholder becomes `image_token`.

    Raises ValueError when the question holds more placeholders than kept images (the context has
    more placeholders than ``images_path`` has entries, and truncation kept them): MileBench's
    LLaVA worker fails on such a sample.
    """
    instruction = instruction or ""
    listed = bool(choices) if has_choice_list is None else has_choice_list
    text = (context or "") + (choice_text(list(choices), task) if listed else "")
    for number in range(1, len(images) + 1):
        text = text.replace(f"{{image#{number}}}", PLACEHOLDER_TEXT)
        text = text.replace(f"{{table#{number}}}", PLACEHOLDER_TEXT)
    fragments = text.split(PLACEHOLDER_TEXT)

    room = token_budget - count_tokens(instruction)
    waiting = list(images)          # utils.py's raw_img_list, popped from its end
    chunks: list[str] = []          # kept fragments, the context's end first
    kept: list[str] = []
    used = 0
    image_first = False             # utils.py's image_start
    cut = False
    for fragment in reversed(fragments):
        length = count_tokens(fragment)
        if length + used > room:
            if not chunks:
                tail = len(range(length)[-room:])   # len(cur_ids[-length_for_context:])
                chunks.append(keep_last_tokens(fragment, tail))
                used += tail
                cut = True
            break
        image_first = False
        chunks.append(keep_last_tokens(fragment, length))
        used += length
        if tokens_per_image + used > room:
            break
        if waiting:
            image_first = True
            kept.insert(0, waiting.pop())
            used += tokens_per_image
    chunks.reverse()
    body = PLACEHOLDER_TEXT.join(chunks)
    if image_first:
        body = PLACEHOLDER_TEXT + body
    question = separate_adjacent_images(instruction + "\n" + body)
    placeholders = question.count(PLACEHOLDER_TEXT)
    if placeholders != len(kept):
        raise ValueError(f"the prompt keeps {placeholders} image placeholders but {len(kept)} of the "
                         f"{len(images)} images: the context has more placeholders than images_path has "
                         f"entries (MileBench's LLaVA worker fails on this sample)")
    return MileBenchPrompt(
        question=question.replace(PLACEHOLDER_TEXT, image_token), images=kept,
        context_tokens=count_tokens(instruction) + used, dropped_images=len(images) - len(kept),
        truncated=cut or len(chunks) < len(fragments),
    )


# The LLaVA worker's conversation (LLaVA's conv_templates["llava_llama_2"], SeparatorStyle.LLAMA_2)
# and generation settings (configs/model_configs.yaml, llava-v1.5-7b), used by model_adapter.VisionLanguageModel
# for MileBench.
LLAVA_WORKER_TEMPLATE = "llava_llama_2"
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. "
                        "You are able to understand the visual content that the user provides, "
                        "and assist the user with a variety of tasks using natural language.")
# Greedy; temperature 0.0 has no effect without sampling. Upstream also stops on the keyword "<s>"
# (KeywordsStoppingCriteria), which in practice never fires before the end-of-sequence token.
LLAVA_WORKER_GEN_KWARGS = {"max_new_tokens": 512, "min_new_tokens": 1, "do_sample": False, "temperature": 0.0}


def llava_worker_prompt(question: str) -> str:
    """The text MileBench's LLaVA worker tokenizes for one question (BOS is added by the tokenizer).

    ``Conversation.get_prompt`` of ``llava_llama_2`` with the question as the user's message and
    an empty assistant message: ``"<s>" + "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{question} [/INST]"``
    with the leading "<s>" stripped (``ret.lstrip(sep)``). Each image is ``<image>`` in `question`.
    """
    if not question:
        raise ValueError("empty question (LLaVA's Conversation.get_prompt asserts the first message is not empty)")
    return f"[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n{question} [/INST]"


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
# Scores: evaluate.py's Eval

# Eval.punct, in its order: each mark is removed when it touches a space in the ORIGINAL text (or
# the text has a 1,000-style number), otherwise replaced by a space.
_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# Eval.periodStrip as written: "(?!<=\d)" is a look-ahead (a typo for the look-behind "(?<!\d)")
# that always holds before a ".", so a period goes unless a digit follows it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# processPunctuation calls periodStrip.sub("", text, re.UNICODE): sub's third positional argument
# is `count`, so only the first re.UNICODE (= 32) such periods are removed.
_PERIODS_REMOVED = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """``Eval.processPunctuation``."""
    out = text
    number_with_comma = _COMMA_STRIP.search(text) is not None
    for mark in _PUNCT:
        if (mark + " " in text or " " + mark in text) or number_with_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIODS_REMOVED)


def normalize_answer(text: str | None) -> str:
    """``Eval.process``: newlines and tabs to spaces, strip, punctuation (`process_punctuation`),
    strip quotes (' then "), strip, lower case. Special tokens are not touched (the worker decodes
    with ``skip_special_tokens=True``; our adapters strip them from the answer). None counts as "".
    """
    text = "" if text is None else str(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text)
    return text.strip("'").strip('"').strip().lower()


def _rouge_sentences(text: str) -> list[str]:
    """``Rouge._get_scores`` (rouge 1.0.1): split at every ".", drop empty pieces, collapse
    whitespace; a piece of only spaces becomes "", which then counts as one (empty) word."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _rouge_words(sentences: Sequence[str]) -> list[str]:
    """``rouge_score._split_into_words``: every sentence split on single spaces, flattened."""
    return [word for sentence in sentences for word in sentence.split(" ")]


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> list[str]:
    """``rouge_score._recon_lcs``: the words of one longest common subsequence of x and y, traced
    back through the package's table with its tie-break (step in x only when that keeps a strictly
    longer LCS). Iterative: the package recurses and so fails past ~1000 words per sentence pair."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        row, above = table[i], table[i - 1]
        for j in range(1, len(y) + 1):
            row[j] = above[j - 1] + 1 if x[i - 1] == y[j - 1] else max(above[j], row[j - 1])
    words: list[str] = []
    i, j = len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    words.reverse()
    return words


def rouge_l(hypothesis: str, reference: str) -> dict[str, float]:
    """``Rouge().get_scores(hypothesis, reference)[0]["rouge-l"]`` of ``rouge==1.0.1`` (MileBench's pin).

    Summary-level ROUGE-L over DISTINCT words: with sentences split at "." and words at spaces,
    LCS_u = the number of distinct words in the union, over every (reference sentence, hypothesis
    sentence) pair, of the words of one LCS (`_lcs_words`); R = LCS_u / distinct reference words,
    P = LCS_u / distinct hypothesis words, F = 2 P R / (P + R + 1e-8). Raises ValueError when a side
    has no sentence (the package raises "Hypothesis is empty." / "Reference is empty.").
    """
    hyp, ref = _rouge_sentences(hypothesis), _rouge_sentences(reference)
    if not hyp or not ref:
        side, text = ("hypothesis", hypothesis) if not hyp else ("reference", reference)
        raise ValueError(f"ROUGE needs a sentence on each side; the {side} {text!r} has none "
                         f"(the rouge package raises on it)")
    reference_words = len(set(_rouge_words(ref)))
    hypothesis_words = len(set(_rouge_words(hyp)))
    union: set[str] = set()
    for ref_sentence in ref:
        ref_split = ref_sentence.split(" ")
        for hyp_sentence in hyp:
            union.update(_lcs_words(ref_split, hyp_sentence.split(" ")))
    recall = len(union) / reference_words
    precision = len(union) / hypothesis_words
    return {"f": 2.0 * ((precision * recall) / (precision + recall + 1e-8)), "p": precision, "r": recall}


def rouge_l_score(prediction: str | None, response: str | None) -> float:
    """``Eval.evaluate_rouge`` for one sample: ROUGE-L F of the normalised answers, 0 for an empty
    prediction. Raises ValueError for an empty normalised reference (evaluate.py asserts)."""
    reference = normalize_answer(response)
    if reference == "":
        raise ValueError(f"reference answer {response!r} is empty after MileBench's normalisation "
                         f"(evaluate.py asserts it is not)")
    hypothesis = normalize_answer(prediction)
    return 0.0 if hypothesis == "" else rouge_l(hypothesis, reference)["f"]


def option_letter(index: int) -> str:
    """``Eval.char``: A..Z, then AA..AZ, then BA, BB, ... (GPR1200 has more than 26 options)."""
    if index < 26:
        return chr(index + 65)
    if index < 52:
        return "A" + chr(index + 65 - 26)
    return "B" + chr(index + 65 - 26 - 26)


_REGEX_SPECIALS = ("\\", ".", "^", "$", "*", "+", "?", "{", "}", "[", "]", "|", "(", ")")


def _option_pattern(option: str) -> str:
    """``preprocess_option_string`` in ``Eval.match_choice``: normalised, regex specials escaped."""
    processed = normalize_answer(option)
    for char in _REGEX_SPECIALS:
        if char in processed:
            processed = processed.replace(char, "\\" + char)
    return processed


def extract_choice(text: str, options: Mapping[str, str]) -> str:
    """``Eval.match_choice``: the option letter(s) MileBench reads from a normalised answer.

    `text` is the normalised prediction, `options` maps letters (`option_letter`) to normalised
    options (each normalised once more here, as upstream). In order:

    - an empty answer is "C";
    - "<letter> <option>" anywhere in the answer: the first character of the leftmost match,
      upper-cased (alternatives tried in option order at each position; "AA x" gives "A");
    - an option's text, spaces ignored on both sides: the leftmost match (first option in order
      at a position) maps back to its letter only where its pattern equals the matched text (an
      option holding an escaped regex special, e.g. "3.5", never does and falls through);
    - a whole answer of 1-2 characters that is a letter ("b" -> "B");
    - else every character of the answer whose upper case is a one-letter key, concatenated
      ("option c" -> "C"; "the answer is c" with options A-D -> "AC", which matches nothing).

    A regex error returns the answer itself, as upstream does.
    """
    if text == "":
        return "C"
    try:
        pattern = "|".join(_option_pattern(f"{key} {value}") for key, value in options.items())
        found = re.search(rf"({pattern})", text, re.S)
        if found:
            return found.group(0)[0].upper()
        pattern = "|".join(_option_pattern(value).replace(" ", "") for value in options.values())
        found = re.search(rf"({pattern})", text.replace(" ", ""), re.S)
        if found:
            for key, value in options.items():
                if found[0].strip() == _option_pattern(value).replace(" ", ""):
                    return key.upper()
        if len(text) in (1, 2) and text.upper() in options:
            return text.upper()
    except (re.error, IndexError):  # upstream catches Exception, prints it and returns the text
        return text
    return "".join(char.upper() for char in text if char.upper() in options)


def judge_multi_choice(prediction: str | None, response: str, choices: Sequence[str]) -> tuple[int, str]:
    """``Eval.judge_multi_choice`` after ``Eval.process_sample``: (1 or 0, the extracted letters).

    Prediction, reference and options are normalised; the reference must be one of the options
    (its first occurrence gives the right letter), else ValueError (evaluate.py asserts).
    """
    answer = normalize_answer(prediction)
    reference = normalize_answer(response)
    options = [normalize_answer(choice) for choice in choices]
    if reference not in options:
        raise ValueError(f"reference answer {response!r} is not one of the options {list(choices)!r} after "
                         f"MileBench's normalisation (evaluate.py asserts it is)")
    selected = extract_choice(answer, {option_letter(i): option for i, option in enumerate(options)})
    return int(selected == option_letter(options.index(reference))), selected


def task_metric(task: str, question_type: str) -> str:
    """How evaluate.py's main() scores a task: a name containing "NeedleInAHaystack" or "MMCoQA"
    (case-sensitive) by exact match, else open-ended by ROUGE-L F, multi-choice by accuracy."""
    if "NeedleInAHaystack" in task or "MMCoQA" in task:
        return "exact_match"
    if question_type == "open-ended":
        return "rouge_l_f"
    if question_type == "multi-choice":
        return "accuracy"
    raise ValueError(f"question type {question_type!r}: MileBench scores 'open-ended' or 'multi-choice' tasks")


def score_sample(task: str, question_type: str, prediction: str | None, response: str,
                 choices: Sequence[str] = ()) -> tuple[str, float]:
    """(metric name, score in [0, 1]) of one MileBench answer, as evaluate.py scores it.

    exact_match (``Eval.evaluate_needle``): needle tasks ask for the normalised reference among the
    normalised prediction's space-separated words, MMCoQA for it as a substring. rouge_l_f:
    `rouge_l_score`. accuracy: `judge_multi_choice`. Raises ValueError where evaluate.py fails
    (an empty reference for ROUGE, a reference that is not an option).
    """
    metric = task_metric(task, question_type)
    if metric == "exact_match":
        reference, answer = normalize_answer(response), normalize_answer(prediction)
        hit = reference in answer.split() if "NeedleInAHaystack" in task else reference in answer
        return metric, float(hit)
    if metric == "rouge_l_f":
        return metric, rouge_l_score(prediction, response)
    return metric, float(judge_multi_choice(prediction, response, choices)[0])


def score_answers(df: pd.DataFrame) -> pd.DataFrame:
    """MileBench answer rows with ``metric`` and ``score`` added (NaN score for error rows).

    Needs ``split`` (the task), ``question_type``, ``raw_answer``, ``label`` (the reference answer),
    ``choice_list``; ``error`` optional. A row that evaluate.py could not score (see `score_sample`)
    gets ``error`` "scoring: <why>", so it is counted with the errors instead of stopping the run.
    """
    frame = df.copy()
    errors = (frame["error"].fillna("").astype(str).tolist() if "error" in frame.columns else [""] * len(frame))
    metrics, scores = [], []
    for position, row in enumerate(frame.itertuples(index=False)):
        task = str(row.split)
        try:
            metric = task_metric(task, row.question_type)
        except ValueError as error:
            metric = "score"
            errors[position] = errors[position] or f"scoring: {error}"
        score = math.nan
        if not errors[position]:
            try:
                score = score_sample(task, row.question_type, row.raw_answer, row.label,
                                     as_list(row.choice_list))[1]
            except ValueError as error:
                errors[position] = f"scoring: {error}"
        metrics.append(metric)
        scores.append(score)
    frame["error"] = errors
    frame["metric"] = metrics
    frame["score"] = scores
    return frame


SUMMARY_COLUMNS = ("scope", "name", "metric", "value", "n", "n_errors")


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Long table of MileBench scores: one row per (scope, name, metric); fractions in [0, 1].

    - "task": the mean item score of each task with its metric: evaluate.py's ``Accuracy`` /
      ``Rouge-L f``, the number ``score.py`` collects (it shows it x100, rounded to 2 decimals).
    - "task_level" (``<task>/<level>``): evaluate.py's ``image_quantity_level-Accuracy`` for the
      levels the task has (eval.json also lists empty levels, as 0).
    - "level", "group", "overall": not computed by upstream (score.py only collects tasks): the
      mean item score over all tasks at a level, and the mean of task scores per group / overall.

    Levels are the rows' ``image_quantity_level``, which the reader derives as evaluate.py does
    (from the number of images in ``images_path``). Error rows are left out of every mean (upstream
    has none: it stops on a missing prediction) and counted in ``n_errors``.
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
