"""The uniform rows every reader produces, and the one error type for bad input.

Every dataset the pipeline reads becomes rows of one of these shapes, whatever file format it came
from, so training and evaluation never look at the original formats. Image references are absolute
paths (or URIs) resolved by the readers; whether the image really exists is checked later, when it is
loaded, so that a missing image is counted as a reject instead of failing the whole read.
"""

from __future__ import annotations

from typing import Any

# A preference pair for DPO. `prompt` is the user's text without the "<image>\n" prefix (the
# conversation template adds it). `source` is "desc" or "pope"; `sample_id` is unique in a dataset
# (description pairs used twice get distinct ids, e.g. "desc-<image_id>-0" and "desc-<image_id>-1").
# `list_index` is the pair's position in HA-DPO's training list (pope pairs, then the description pairs
# twice): the order the recipe's seeded permutation is applied to.
PREFERENCE_COLUMNS = ("sample_id", "source", "image_id", "image", "prompt", "chosen", "rejected", "list_index")
# Rows of `data.preference` sources also have `images`: all of the row's image paths in prompt order (`image` is
# the first). A prompt either has no <image> placeholder (the template puts one per image before the text) or
# exactly one per image, where the images stand.
PREFERENCE_IMAGES = "images"

# A supervised example (warm-up stage): one image, one prompt, one target response.
SFT_COLUMNS = ("sample_id", "image_id", "image", "prompt", "response")

# The name of the POPE dataset the single form `data.pope: {questions, image_root}` configures: POPE's own
# COCO set (the one LLaVA-1.5 and HA-DPO report). Its splits keep their bare names (random, popular,
# adversarial) in answers, metrics and sweep objectives (`pope/adversarial/f1`); any other dataset's split
# is named "<dataset>/<split>" (`pope/gqa/adversarial/f1`); `orchestrator.eval.pope.qualified_split` owns
# the rule.
POPE_DEFAULT_DATASET = "coco"

# POPE's three splits, in the order its papers list them: each is named after how its negative questions
# were sampled (random absent objects, the most frequent absent ones, the absent ones that most often
# co-occur with the present ones). The one list the builder, the readers, the scoring and the report use.
POPE_SPLITS = ("random", "popular", "adversarial")

# A POPE question. `dataset` names the POPE set (e.g. coco, aokvqa, gqa: `data.pope.datasets`); `label`
# is "yes" or "no"; `split` is random / popular / adversarial (or the question file's stem for other
# sets); `version` records which question file it came from.
POPE_COLUMNS = ("dataset", "question_id", "split", "image", "question", "label", "version")

# A MileBench sample. `images` is images_path's list of paths, in the file's order; `choice_list`
# is [] when the sample has none, and `has_choice_list` says whether the sample has the key at all
# (MileBench's prompt gets the choice-list suffix whenever it does, even for an empty list).
# `image_quantity_level` ("few" / "medium" / "many") comes from the number of images, as MileBench
# scores it.
MILEBENCH_COLUMNS = (
    "sample_id", "task", "question_type", "instruction", "context", "images", "choice_list",
    "has_choice_list", "response", "image_quantity_level",
)


class DataFormatError(ValueError):
    """A record does not have the shape its format requires.

    The message names the file, the record (line number, list index or object key) and the field,
    and says what was expected, e.g.
    ``pope_data.json: record 17: field 'question': expected a non-empty string, got null``.
    """

    def __init__(self, path: Any, record: Any, field: str | None, expected: str, got: Any = None):
        self.path, self.record, self.field, self.expected, self.got = str(path), record, field, expected, got
        where = f"{self.path}: record {record}" if record is not None else self.path
        if field is not None:
            where += f": field {field!r}"
        message = f"{where}: expected {expected}"
        if got is not None:
            shown = repr(got)
            message += f", got {shown[:80] + '...' if len(shown) > 80 else shown}"
        super().__init__(message)


class ImagePathRejected(DataFormatError):
    """An image path read from a record that leaves its root (``../``) or is absolute.

    The record is set aside as a reject, counted like a missing image, instead of failing the whole
    file; a reader called without a list for rejects raises it like any other `DataFormatError`.
    """

    def __init__(self, path: Any, record: Any, field: str, reason: str):
        super().__init__(path, record, field, "an image path inside its root", _Reason(reason))


class _Reason(str):
    """Shown unquoted in the message (it is a sentence, not a value)."""

    def __repr__(self) -> str:
        return str(self)
