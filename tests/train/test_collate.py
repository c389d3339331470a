"""Rows -> model inputs: 2B rows chosen first, images duplicated, labels and padding, bad images skipped."""

import os
import time

import pytest
import torch

from orchestrator.data import datasets
from orchestrator.model.families import load_model
from orchestrator.model.templates import IGNORE_INDEX
from orchestrator.train.collate import collate_preference, collate_sft, labelled_window, pad_sequences
from orchestrator.train.losses import sequence_logps
from tests.train import as_batch, sample_preference_rows, tiny_config


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def preference_rows(synth_world, tmp_path_factory):
    return sample_preference_rows(tmp_path_factory.mktemp("runs"), synth_world[0], per_source=2)


def full_labels(inputs):
    """Labels over all positions (collate returns only the last `logits_to_keep`)."""
    width = inputs.input_ids.shape[1]
    pad = torch.full((inputs.labels.shape[0], width - inputs.logits_to_keep), IGNORE_INDEX)
    return torch.cat([pad, inputs.labels], dim=1)


def test_pairs_become_2b_rows_with_chosen_first_and_images_duplicated(loaded, preference_rows):
    inputs = collate_preference(as_batch(preference_rows), loaded, "v1", 256)
    pairs = len(preference_rows)
    assert inputs.num_examples == pairs and inputs.input_ids.shape[0] == 2 * pairs
    pixels = inputs.vision.tensors["pixel_values"]
    assert torch.equal(pixels[:pairs], pixels[pairs:])
    labels = full_labels(inputs)
    tokenizer = loaded.tokenizer
    for i, row in enumerate(preference_rows):
        for j, text in ((i, row["chosen"]), (i + pairs, row["rejected"])):
            answer = labels[j][labels[j] != IGNORE_INDEX].tolist()
            assert answer == tokenizer(text.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        # chosen and rejected share the same prompt ids (image tokens expanded once per row)
        chosen_ids = inputs.input_ids[i][inputs.attention_mask[i].bool()]
        rejected_ids = inputs.input_ids[i + pairs][inputs.attention_mask[i + pairs].bool()]
        n = int((labels[i][: len(chosen_ids)] == IGNORE_INDEX).sum())
        assert torch.equal(chosen_ids[:n], rejected_ids[:n])
        assert int((chosen_ids == loaded.image_token_id).sum()) == loaded.tokens_per_image


def test_right_padding_pads_the_end_with_pad_id_and_ignored_labels(loaded, preference_rows):
    inputs = collate_preference(as_batch(preference_rows), loaded, "v1", 256, padding_side="right")
    labels = full_labels(inputs)
    pad = loaded.tokenizer.pad_token_id
    for row_ids, row_mask, row_labels in zip(inputs.input_ids, inputs.attention_mask, labels):
        length = int(row_mask.sum())
        assert row_mask[:length].all() and not row_mask[length:].any()
        assert (row_ids[length:] == pad).all() and (row_labels[length:] == IGNORE_INDEX).all()
        assert row_labels[length - 1] == loaded.tokenizer.eos_token_id


def test_left_padding_pads_the_start():
    ids, labels, mask = pad_sequences([[5, 6, 7], [8]], [[IGNORE_INDEX, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_labelled_window_starts_one_before_the_earliest_label():
    labels = torch.tensor([[IGNORE_INDEX] * 5 + [1, 2, IGNORE_INDEX], [IGNORE_INDEX] * 3 + [4, 5, 6, 7, 8]])
    assert labelled_window(labels) == 8 - 3 + 1


def test_logits_to_keep_gives_the_same_sequence_logps_as_full_logits(loaded, preference_rows):
    inputs = collate_preference(as_batch(preference_rows), loaded, "v1", 256)
    model = loaded.model.eval()
    with torch.no_grad():
        kept = model(**inputs.model_inputs()).logits
        everything = model(**{**inputs.model_inputs(), "logits_to_keep": 0}).logits
    assert kept.shape[1] == inputs.logits_to_keep < everything.shape[1]
    # the same float32 log-probs summed: sums of ~100 may differ by one ulp (~1.5e-5), nothing more
    torch.testing.assert_close(sequence_logps(kept, inputs.labels),
                               sequence_logps(everything, full_labels(inputs)), atol=1e-5, rtol=2e-7)


def test_a_row_whose_image_fails_to_load_is_skipped_and_counted(loaded, preference_rows, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    rows = [dict(preference_rows[0], sample_id="gone", image=str(tmp_path / "missing.jpg")),
            dict(preference_rows[1], sample_id="corrupt", image=str(broken)), *preference_rows[2:]]
    inputs = collate_preference(as_batch(rows), loaded, "v1", 256)
    assert inputs.num_examples == len(rows) - 2 and inputs.input_ids.shape[0] == 2 * (len(rows) - 2)
    assert [s["sample_id"] for s in inputs.skipped] == ["gone", "corrupt"]
    assert "file not found" in inputs.skipped[0]["reason"]
    assert collate_preference(as_batch(rows[:2]), loaded, "v1", 256) is None


def test_sft_rows_are_labelled_on_the_response(loaded, synth_world, tmp_path):
    world, _ = synth_world
    rows = datasets.sft_rows(tiny_config(tmp_path, world))[:3]
    inputs = collate_sft(as_batch(rows), loaded, "v1", 256)
    assert inputs.num_examples == 3 and inputs.input_ids.shape[0] == 3
    labels = full_labels(inputs)
    for row, row_labels in zip(rows, labels):
        answer = row_labels[row_labels != IGNORE_INDEX].tolist()
        tokenizer = loaded.tokenizer
        assert answer == tokenizer(row["response"].strip(), add_special_tokens=False)["input_ids"] + [2]


def test_an_image_is_processed_once_and_again_only_when_its_file_changes(loaded, preference_rows, tmp_path):
    from PIL import Image

    from orchestrator.model.families import ImageInputsCache

    path = tmp_path / "scene.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    loaded.image_cache = ImageInputsCache()
    made = []
    original = loaded.vision_inputs
    loaded.vision_inputs = lambda images: made.append(1) or original(images)
    try:
        rows = [dict(preference_rows[0], sample_id=f"r{i}", image=str(path)) for i in range(3)]
        first = collate_preference(as_batch(rows), loaded, "v1", 256)
        assert len(made) == 1 and len(loaded.image_cache) == 1   # three rows, one image processed
        assert torch.equal(first.vision.tensors["pixel_values"][0], original([Image.open(path)]).tensors["pixel_values"][0])
        Image.new("RGB", (40, 30), (10, 10, 200)).save(path)      # the same path, new content
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        second = collate_preference(as_batch(rows), loaded, "v1", 256)
        assert len(made) == 2
        assert not torch.equal(first.vision.tensors["pixel_values"], second.vision.tensors["pixel_values"])
    finally:
        del loaded.vision_inputs
        loaded.image_cache = ImageInputsCache()


def test_the_image_cache_keeps_the_most_recently_used_inputs_within_its_bytes(tmp_path):
    from orchestrator.model.families import ImageInputsCache, VisionInputs

    def inputs(value):
        return VisionInputs({"pixel_values": torch.full((1, 3, 4, 4), float(value))}, [1])   # 192 bytes

    paths = []
    for name in "abc":
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(name)
    cache = ImageInputsCache(max_bytes=2 * 192)
    made = []

    def get(index):
        return cache.get(paths[index], lambda: made.append(index) or inputs(index))

    get(0), get(1), get(0), get(2)        # 1 is the least recently used when 2 arrives
    assert made == [0, 1, 2] and len(cache) == 2 and cache.held == 2 * 192
    get(0), get(1)
    assert made == [0, 1, 2, 1]            # 0 stayed, 1 was made again
    assert cache.get(str(tmp_path / "missing"), lambda: inputs(9)).tensors["pixel_values"][0, 0, 0, 0] == 9
    assert len(cache) == 2                 # what cannot be stat'ed is not kept
