"""Packed pairs [prompt, chosen, rejected] score exactly what the plain 2B-row layout scores."""

import pytest
import torch

from orchestrator.model.families import load_model
from orchestrator.train.collate import collate_preference
from orchestrator.train.losses import sequence_logps
from orchestrator.train.pairs import (CHOSEN, PAD, PROMPT, REJECTED, attention_mask, collate_packed, pair_forward,
                                      pair_token_logps, score_pairs)
from tests.train import as_batch, sample_preference_rows


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def loaded(request, tiny_model_dir):
    return load_model(tiny_model_dir, attn_implementation=request.param)


@pytest.fixture(scope="module")
def rows(synth_world, tmp_path_factory):
    # answers of different lengths on both sides, so padding and windows differ between rows
    return sample_preference_rows(tmp_path_factory.mktemp("runs"), synth_world[0], per_source=3)


def test_packed_log_probs_equal_the_plain_layout(loaded, rows):
    model = loaded.model.eval()
    batch = as_batch(rows)
    plain = collate_preference(batch, loaded, "v1", 512)
    packed = collate_packed(batch, loaded, "v1", 512)
    assert packed.sample_ids == plain.sample_ids == [str(r["sample_id"]) for r in rows]
    with torch.no_grad():
        plain_chosen, plain_rejected = sequence_logps(pair_forward(model, plain, "cpu"), plain.labels) \
            .split(plain.num_examples)
        packed_chosen, packed_rejected = score_pairs(model, packed, "cpu")
        # and through the plain layout's own path of score_pairs
        again_chosen, again_rejected = score_pairs(model, plain, "cpu")
    assert torch.allclose(packed_chosen, plain_chosen, atol=1e-4, rtol=0)
    assert torch.allclose(packed_rejected, plain_rejected, atol=1e-4, rtol=0)
    assert torch.equal(again_chosen, plain_chosen) and torch.equal(again_rejected, plain_rejected)
    # the answers differ, so a mask that let the rejected answer see the chosen one would show
    assert not torch.allclose(packed_chosen, packed_rejected)


def test_rows_padded_to_a_multiple_score_the_same(loaded, rows):
    """train.pad_to_multiple_of: wider rows (fewer distinct shapes), the same log-probs."""
    model = loaded.model.eval()
    batch = as_batch(rows)
    exact = collate_packed(batch, loaded, "v1", 512)
    padded = collate_packed(batch, loaded, "v1", 512, pad_to_multiple_of=64)
    assert padded.input_ids.shape[1] % 64 == 0 and padded.input_ids.shape[1] >= exact.input_ids.shape[1]
    assert padded.num_tokens == exact.num_tokens
    with torch.no_grad():
        for got, want in zip(score_pairs(model, padded, "cpu"), score_pairs(model, exact, "cpu")):
            assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_packed_gradients_equal_the_plain_layout(loaded, rows):
    """The DPO loss's gradient flows through the shared prompt once: same gradients as two rows."""
    model = loaded.model.train()
    batch = as_batch(rows[:4])
    grads = []
    for inputs in (collate_preference(batch, loaded, "v1", 512), collate_packed(batch, loaded, "v1", 512)):
        model.zero_grad(set_to_none=True)
        chosen, rejected = pair_token_logps(pair_forward(model, inputs, "cpu"), inputs).sums()
        (chosen - rejected).sigmoid().log().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    model.eval()
    plain, packed = grads
    assert plain.keys() == packed.keys() and len(plain) > 10
    for name in plain:
        scale = max(plain[name].abs().max().item(), 1e-6)
        assert (plain[name] - packed[name]).abs().max().item() <= 1e-4 * max(scale, 1.0), name


def test_packed_layout_positions_and_mask():
    segments = torch.tensor([[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, PAD]])
    allowed = attention_mask(segments, "sdpa", torch.float32)[0, 0]
    # prompt: causal over the prompt; chosen: prompt + itself; rejected: prompt + itself, never chosen
    assert allowed[1].tolist() == [True, True, False, False, False, False]
    assert allowed[3].tolist() == [True, True, True, True, False, False]
    assert allowed[4].tolist() == [True, True, False, False, True, False]
    assert allowed[5].tolist() == [False, False, False, False, False, True]  # padding: itself only
    additive = attention_mask(segments, "eager", torch.float32)[0, 0]
    assert torch.equal(additive == 0, allowed)
    with pytest.raises(ValueError, match="prefix_sharing"):
        attention_mask(segments, "flash_attention_2", torch.float32)


def test_packed_rows_share_one_prompt_and_restart_positions(loaded, rows):
    packed = collate_packed(as_batch(rows[:1]), loaded, "v1", 512)
    segments, positions = packed.segments[0], packed.position_ids[0]
    prompt = int((segments == PROMPT).sum())
    chosen = int((segments == CHOSEN).sum())
    rejected = int((segments == REJECTED).sum())
    assert packed.vision.tensors["pixel_values"].shape[0] == 1  # one image per pair
    assert positions[prompt:prompt + chosen].tolist() == list(range(prompt, prompt + chosen))
    assert positions[prompt + chosen:prompt + chosen + rejected].tolist() == list(range(prompt, prompt + rejected))
    assert packed.chosen_source[0, 0] == packed.rejected_source[0, 0] == prompt - 1
    assert packed.num_tokens == prompt + chosen + rejected


def test_packed_answers_are_cut_like_the_plain_layout(loaded, rows):
    batch = as_batch(rows[:2])
    prompts = (collate_packed(batch, loaded, "v1", 600).segments == PROMPT).sum(-1)
    limit = int(prompts.max()) + 4  # every answer is cut, the longest prompt's to 4 tokens
    plain = collate_preference(batch, loaded, "v1", limit)
    packed = collate_packed(batch, loaded, "v1", limit)
    with torch.no_grad():
        expected = sequence_logps(pair_forward(loaded.model.eval(), plain, "cpu"), plain.labels)
        chosen, rejected = score_pairs(loaded.model, packed, "cpu")
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=1e-4, rtol=0)
    answer_lengths = (packed.chosen_target != -100).sum(-1)
    assert (answer_lengths <= limit - prompts).all() and int(answer_lengths.min()) == 4


def test_unloadable_image_is_skipped_and_reported(loaded, rows, tmp_path):
    broken = dict(rows[0], image=str(tmp_path / "missing.jpg"), sample_id="broken-1")
    packed = collate_packed(as_batch([broken, rows[1]]), loaded, "v1", 512)
    assert packed.num_examples == 1 and packed.sample_ids == [str(rows[1]["sample_id"])]
    assert packed.skipped[0]["sample_id"] == "broken-1"
    assert collate_packed(as_batch([broken]), loaded, "v1", 512) is None


def test_longest_row_tokens_is_the_longest_plain_row(loaded, rows):
    from orchestrator.train.pairs import longest_row_tokens

    plain = collate_preference(as_batch(rows), loaded, "v1", 512)
    longest = int(plain.attention_mask.sum(-1).max())
    assert longest_row_tokens(rows, loaded, "v1", 512) == longest
    assert longest_row_tokens(rows, loaded, "v1", longest - 5) == longest - 5  # cut at max_length, as collation cuts


def test_multi_image_rows_put_one_image_per_placeholder_and_score_alike_in_both_layouts(loaded, rows):
    """Rows of `data.preference` sources carry `images`: the prompt gets one image per placeholder (leading ones
    added by the template, inner ones where they stand) and the pixels follow row by row."""
    model = loaded.model.eval()
    first = rows[0]
    second = next(row for row in rows if row["image"] != first["image"])
    multi = [
        {**first, "sample_id": "two-leading", "images": [first["image"], second["image"]]},
        {**second, "sample_id": "one", "images": [second["image"]]},
        {**first, "sample_id": "two-inner", "images": [second["image"], first["image"]],
         "prompt": f"<image>\n{first['prompt']}\n<image>"},
    ]
    batch = as_batch(multi)
    plain = collate_preference(batch, loaded, "v1", 512)
    packed = collate_packed(batch, loaded, "v1", 512)
    pixels = packed.vision.tensors["pixel_values"]
    assert pixels.shape[0] == 5 and plain.vision.tensors["pixel_values"].shape[0] == 10  # plain: chosen, then rejected
    image_tokens = (packed.input_ids == loaded.image_token_id).sum(1) // loaded.tokens_per_image
    assert image_tokens.tolist() == [2, 1, 2]
    with torch.no_grad():
        plain_chosen, plain_rejected = score_pairs(model, plain, "cpu")
        packed_chosen, packed_rejected = score_pairs(model, packed, "cpu")
    assert torch.allclose(packed_chosen, plain_chosen, atol=1e-4, rtol=0)
    assert torch.allclose(packed_rejected, plain_rejected, atol=1e-4, rtol=0)
    # the second image is seen: swapping it changes the two-image row's score, not the one-image row's
    swapped = as_batch([{**multi[0], "images": [first["image"], first["image"]]}, multi[1]])
    assert not torch.equal(collate_packed(swapped, loaded, "v1", 512).vision.tensors["pixel_values"], pixels[:3])
    with torch.no_grad():
        swapped_chosen, _ = score_pairs(model, collate_packed(swapped, loaded, "v1", 512), "cpu")
    assert not torch.isclose(swapped_chosen[0], packed_chosen[0], atol=1e-5)
    assert torch.isclose(swapped_chosen[1], packed_chosen[1], atol=1e-5)
