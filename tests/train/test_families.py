"""DPO and SFT inputs for every model family: each row's images counted at their own token counts, labels on the
answers only, LLaVA-NeXT's pairs packed with the plain layout's log-probs, Qwen2.5-VL's kept as plain rows
(its multimodal rotary positions) whose right padding changes no log-prob."""

import logging
import math

import pytest
import torch
from PIL import Image

from orchestrator.data import datasets
from orchestrator.model.families import load_model
from orchestrator.model.templates import IGNORE_INDEX
from orchestrator.train.collate import Collated, collate_preference, collate_sft
from orchestrator.train.losses import dpo_loss, sequence_logps
from orchestrator.train.pairs import PackedPairs, collate_packed, collate_pairs, longest_row_tokens, score_pairs
from tests.train import as_batch, sample_preference_rows, tiny_config

SIZES = [(64, 40), (40, 64), (64, 64)]  # wide, tall, square: different tiles (NeXT) and grids (Qwen)


@pytest.fixture(scope="module")
def loaded(tiny_family_dir):
    return load_model(tiny_family_dir, dtype="float32")


@pytest.fixture(scope="module")
def rows(synth_world, tmp_path_factory):
    """Preference rows whose images have different sizes (the synthetic world's are all square), and a
    two-image row."""
    folder = tmp_path_factory.mktemp("sized")
    rows = sample_preference_rows(folder, synth_world[0], per_source=3)
    for index, row in enumerate(rows):
        path = folder / f"{index}.png"
        Image.open(row["image"]).convert("RGB").resize(SIZES[index % len(SIZES)]).save(path)
        row["image"] = str(path)
    rows.append({**rows[1], "sample_id": "two-images", "images": [rows[0]["image"], rows[1]["image"]]})
    for row in rows[:-1]:
        row["images"] = [row["image"]]
    return rows


def full_labels(inputs: Collated) -> torch.Tensor:
    width = inputs.input_ids.shape[1]
    pad = torch.full((inputs.labels.shape[0], width - inputs.logits_to_keep), IGNORE_INDEX)
    return torch.cat([pad, inputs.labels], dim=1)


@pytest.mark.parametrize("template", ["v1", "chat"])
def test_preference_rows_count_each_images_tokens_and_label_only_the_answers(loaded, rows, template):
    inputs = collate_preference(as_batch(rows), loaded, template, 512)
    pairs = len(rows)
    assert inputs.num_examples == pairs and not inputs.skipped
    tokenizer = loaded.tokenizer
    per_row = [loaded.vision_inputs([Image.open(path) for path in row["images"]]).tokens for row in rows]
    assert len({count for counts in per_row for count in counts}) > 1  # the sizes give different counts
    assert inputs.vision.tokens == [count for counts in per_row for count in counts] * 2  # chosen rows, rejected rows
    labels = full_labels(inputs)
    for i, row in enumerate(rows):
        for j, text in ((i, row["chosen"]), (i + pairs, row["rejected"])):
            real = inputs.attention_mask[j].bool()
            assert int((inputs.input_ids[j][real] == loaded.image_token_id).sum()) == sum(per_row[i])
            answer = labels[j][labels[j] != IGNORE_INDEX].tolist()
            assert answer == tokenizer(text.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            labelled = (labels[j] != IGNORE_INDEX).nonzero().flatten()
            assert labelled.tolist() == list(range(int(real.sum()) - len(answer), int(real.sum())))  # the row's end
    assert tokenizer.unk_token_id not in inputs.input_ids[inputs.attention_mask.bool()].tolist()
    with torch.no_grad():
        chosen, rejected = score_pairs(loaded.model.eval(), inputs, "cpu")
    losses, _, _ = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach() + 1.0, 0.1)
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all() and (chosen < 0).all()
    assert math.isfinite(losses.mean().item())


def test_sft_rows_label_the_response(loaded, synth_world, tmp_path):
    sft = datasets.sft_rows(tiny_config(tmp_path, synth_world[0]))[:2]
    inputs = collate_sft(as_batch(sft), loaded, "chat", 512)
    labels = full_labels(inputs)
    for row, row_labels in zip(sft, labels):
        answer = row_labels[row_labels != IGNORE_INDEX].tolist()
        assert answer == loaded.tokenizer(row["response"].strip(), add_special_tokens=False)["input_ids"] + \
            [loaded.tokenizer.eos_token_id]
    with torch.no_grad():
        logits = loaded.model(**inputs.model_inputs()).logits
    assert torch.isfinite(sequence_logps(logits, inputs.labels)).all()


def test_longest_row_tokens_counts_each_images_own_tokens(loaded, rows):
    plain = collate_preference(as_batch(rows), loaded, "v1", 512)
    longest = int(plain.attention_mask.sum(-1).max())
    assert longest_row_tokens(rows, loaded, "v1", 512) == longest


def test_a_full_finetune_folder_collates_and_scores_as_its_base(loaded, rows, tmp_path):
    """What a full fine-tune checkpoint holds (checkpoints.save_checkpoint): the weights and the files
    `save_processing` writes, enough for the folder to load on its own and build the same inputs."""
    loaded.model.save_pretrained(tmp_path)
    loaded.save_processing(tmp_path)
    again = load_model(tmp_path, dtype="float32")
    assert again.family == loaded.family and again.chat_template == loaded.chat_template
    batch = as_batch(rows[:3])
    ours, theirs = collate_preference(batch, loaded, "chat", 512), collate_preference(batch, again, "chat", 512)
    assert torch.equal(ours.input_ids, theirs.input_ids) and ours.vision.tokens == theirs.vision.tokens
    for name, tensor in ours.vision.tensors.items():
        assert torch.equal(tensor, theirs.vision.tensors[name]), name
    with torch.no_grad():
        saved, base = score_pairs(again.model.eval(), theirs, "cpu"), score_pairs(loaded.model.eval(), ours, "cpu")
    assert all(torch.equal(got, want) for got, want in zip(saved, base))


@pytest.mark.parametrize("tiny_family_dir", ["llava_next"], indirect=True)
def test_llava_next_packed_pairs_score_what_the_plain_rows_score(loaded, rows):
    """NeXT's anyres features replace its image tokens one for one, so packed positions stay 1-D counts; rows
    with different tile counts are padded to the most tiles and the model drops the padding (image_sizes)."""
    batch = as_batch(rows)
    packed = collate_pairs(batch, loaded, "v1", 512, packed=True)
    plain = collate_pairs(batch, loaded, "v1", 512, packed=False)
    assert isinstance(packed, PackedPairs) and isinstance(plain, Collated)
    assert packed.vision.tensors["pixel_values"].dim() == 5 and len(packed.vision.tokens) == len(rows) + 1
    model = loaded.model.eval()
    with torch.no_grad():
        packed_values = score_pairs(model, packed, "cpu")
        plain_values = score_pairs(model, plain, "cpu")
    for got, want in zip(packed_values, plain_values):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(*packed_values)


@pytest.mark.parametrize("tiny_family_dir", ["qwen2_5_vl"], indirect=True)
def test_qwen_pairs_stay_plain_rows_with_one_log_line(tiny_family_dir, rows, caplog):
    loaded = load_model(tiny_family_dir, dtype="float32")  # its own: the line is said once per loaded model
    with caplog.at_level(logging.INFO, logger="orchestrator.train.pairs"):
        first = collate_pairs(as_batch(rows[:2]), loaded, "v1", 512, packed=True)
        again = collate_pairs(as_batch(rows[2:4]), loaded, "v1", 512, packed=True)
    assert isinstance(first, Collated) and isinstance(again, Collated)
    said = [record.getMessage() for record in caplog.records if "prefix_sharing" in record.getMessage()]
    assert len(said) == 1 and "qwen2_5_vl" in said[0] and "multimodal rotary positions" in said[0]
    with pytest.raises(ValueError, match="multimodal rotary positions"):
        collate_packed(as_batch(rows[:2]), loaded, "v1", 512)
    inputs = first.model_inputs()
    assert "position_ids" not in inputs and "image_grid_thw" in inputs  # the model computes its 3-D positions


@pytest.mark.parametrize("tiny_family_dir", ["qwen2_5_vl"], indirect=True)
def test_qwen_right_padded_rows_score_as_each_row_alone(loaded, rows):
    """Rows of different lengths and image grids in one batch: Qwen computes each row's 3-D positions from its
    own tokens, grids and attention mask, so the padding changes nothing."""
    model = loaded.model.eval()
    together = collate_preference(as_batch(rows), loaded, "v1", 512)
    assert (together.attention_mask == 0).any()  # some rows are padded
    with torch.no_grad():
        batched = score_pairs(model, together, "cpu")
        alone = [score_pairs(model, collate_preference(as_batch([row]), loaded, "v1", 512), "cpu") for row in rows]
    for column in (0, 1):
        torch.testing.assert_close(batched[column], torch.cat([values[column] for values in alone]), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("tiny_family_dir", ["qwen2_5_vl"], indirect=True)
def test_the_reference_pass_scores_qwen_pairs_as_a_direct_computation(ray_session, tiny_family_dir, loaded, rows,
                                                                       synth_world, tmp_path):
    """The Ray Data pass (its actors load the model themselves, sort the pairs by length and batch 3 at a time,
    packing refused) gives each pair the log-probs of one direct forward over all of them."""
    from orchestrator.train.reference_cache import precompute_reference

    cfg = tiny_config(tmp_path, synth_world[0], "train.batch_size_per_worker=3", "model.family=qwen2_5_vl")
    cache = precompute_reference(cfg, tiny_family_dir, ray_session.data.from_items(rows), tmp_path / "cache")
    assert cache.counts["errors"] == 0
    values = cache.load()
    direct = collate_preference(as_batch(rows), loaded, cfg.model.train_template, cfg.train.max_length)
    with torch.no_grad():
        chosen, rejected = score_pairs(loaded.model.eval(), direct, "cpu")
    cached = torch.tensor([values[sample_id] for sample_id in direct.sample_ids], dtype=torch.float64)
    torch.testing.assert_close(cached[:, 0], chosen.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(cached[:, 1], rejected.double(), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("tiny_family_dir", ["qwen2_5_vl"], indirect=True)
def test_qwen_dpo_with_lora_trains_checkpoints_and_fills_the_reference_cache(ray_session, tiny_family_dir, loaded,
                                                                               synth_world, tmp_path):
    """Qwen2.5-VL, the most different family, through `run_training`: 2 workers, LoRA, prefix_sharing on (so
    refused: plain rows), the reference computed in the loop and added to the cache at the checkpoint."""
    from peft import PeftModel
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from orchestrator.train.reference_cache import default_cache_root, open_reference_cache
    from orchestrator.train.trainer import run_training

    cfg = tiny_config(tmp_path, synth_world[0], "name=qwen", "model.family=qwen2_5_vl", "train.max_steps=2",
                      "train.checkpoint_every_steps=2", "train.log_every_steps=1", "train.learning_rate=1e-3",
                      "train.warmup_ratio=0.0", "wandb.mode=disabled", "train.prefix_sharing=true")
    rows = datasets.preference_rows(cfg)
    result = run_training(cfg, "dpo", base_model=str(tiny_family_dir), dataset=ray_session.data.from_items(rows))
    curves = pq.read_table(result.curves_path).to_pylist()
    assert [row["step"] for row in curves] == [1, 2] and result.metrics["step"] == 2
    assert curves[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: the policy is the reference
    assert all(math.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in curves)

    assert result.checkpoint_path.endswith("/adapter")
    weights = load_file(f"{result.checkpoint_path}/adapter_model.safetensors")
    assert weights and all(".lora_" in key and "language_model" in key for key in weights)
    trained = PeftModel.from_pretrained(load_model(tiny_family_dir, dtype="float32").model, result.checkpoint_path)

    folders = list(default_cache_root(cfg).glob("*/"))
    assert len(folders) == 1
    cache = open_reference_cache(folders[0])
    assert cache.meta()["filled_by"] == ["loop"]
    values = cache.load()
    assert len(values) == 2 * 2 * cfg.train.batch_size_per_worker  # every pair the 2 steps of 2 workers trained on
    by_id = {str(row["sample_id"]): row for row in rows}
    some = as_batch([by_id[sample_id] for sample_id in sorted(values)[:4]])
    inputs = collate_preference(some, loaded, cfg.model.train_template, cfg.train.max_length)
    with torch.no_grad():
        reference = score_pairs(loaded.model.eval(), inputs, "cpu")
        policy = score_pairs(trained.eval(), inputs, "cpu")
    cached = torch.tensor([values[sample_id] for sample_id in inputs.sample_ids], dtype=torch.float64)
    torch.testing.assert_close(cached[:, 0], reference[0].double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(cached[:, 1], reference[1].double(), atol=1e-4, rtol=0)
    assert not torch.allclose(policy[0], reference[0])  # the saved adapter is the trained one


def test_the_reference_cache_key_names_the_layout_the_family_scores_with(tiny_family_dir, synth_world, tmp_path):
    """Qwen2.5-VL's pairs are plain rows whatever train.prefix_sharing says, so its cache is shared by both
    settings; LLaVA-NeXT's packed and plain numbers are kept apart (equal in exact arithmetic, not in bf16)."""
    from orchestrator.model.families import family_of
    from orchestrator.train.reference_cache import reference_key

    keys = [reference_key(tiny_family_dir, tiny_config(tmp_path, synth_world[0], f"train.prefix_sharing={on}"),
                          "float32") for on in ("true", "false")]
    assert (keys[0] == keys[1]) == (family_of(tiny_family_dir) == "qwen2_5_vl")
