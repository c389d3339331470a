"""Reference log-probs precomputed once in a Ray Data pass: the in-loop numbers, keyed, resumable, errors kept.

One pass over 12 pairs (`first_pass`, 4 rows per part) is shared; the resume test works on a copy of it.
"""

import json
import math
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from orchestrator.data import datasets
from orchestrator.model.families import load_model
from orchestrator.files import file_sha256
from orchestrator.train.pairs import collate_pairs, score_pairs
from orchestrator.train.reference_cache import (ReferenceCache, file_fingerprint, open_reference_cache,
                                                precompute_reference, reference_key, sample_offsets)
from tests.train import tiny_config


@pytest.fixture(scope="module")
def cfg(synth_world, tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("runs"), synth_world[0], "train.batch_size_per_worker=4")


@pytest.fixture(scope="module")
def rows(cfg):
    rows = datasets.preference_rows(cfg)
    # description pairs (long answers) and pope pairs (short ones): batches with different padding
    return [row for row in rows if row["source"] == "desc"][:6] + [row for row in rows if row["source"] == "pope"][:6]


@pytest.fixture(scope="module")
def first_pass(ray_session, cfg, rows, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference-cache")
    cache = precompute_reference(cfg, tiny_model_dir, ray_session.data.from_items(rows), root, rows_per_part=4)
    return root, cache


def as_batch(rows):
    return {key: [row[key] for row in rows] for key in rows[0]}


def ids(rows):
    return [str(row["sample_id"]) for row in rows]


def test_cached_values_equal_the_in_loop_reference(first_pass, cfg, rows, tiny_model_dir):
    root, cache = first_pass
    assert cache.counts == {"rows": 12, "cached": 0, "computed": 12, "errors": 0}
    assert cache.path == root / cache.key
    # reopened from a path string, as a Ray Train worker does
    reopened = open_reference_cache(str(cache.path))
    assert reopened.key == cache.key
    values = reopened.load()
    assert sorted(values) == sorted(ids(rows))
    assert reopened.coverage(ids(rows) + ["not-a-pair"]) == (12, ["not-a-pair"])
    table = pq.read_table(cache.parts()[0])
    assert str(table.schema.field("ref_chosen").type) == "double" and set(table.column("error").to_pylist()) == {""}
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["key"] == cache.key and meta["rows"] == 12 and meta["dtype"] == "float32"
    assert meta["model_path"] == str(tiny_model_dir.resolve()) and meta["template"] == cfg.model.train_template

    # the same pairs scored directly, in other batches than the pass used (it sorts by length)
    loaded = load_model(tiny_model_dir, dtype="float32", attn_implementation=cfg.model.attn_implementation)
    model = loaded.model.eval()
    some = [rows[0], rows[7], rows[3], rows[10], rows[5]]
    with torch.no_grad():
        packed = collate_pairs(as_batch(some), loaded, cfg.model.train_template, cfg.train.max_length, packed=True)
        plain = collate_pairs(as_batch(some), loaded, cfg.model.train_template, cfg.train.max_length, packed=False)
        direct = score_pairs(model, packed, "cpu")
        unpacked = score_pairs(model, plain, "cpu")
    assert packed.sample_ids == plain.sample_ids == ids(some)
    cached = torch.tensor([values[sample_id] for sample_id in packed.sample_ids], dtype=torch.float64)
    for column, (packed_values, plain_values) in enumerate(zip(direct, unpacked)):
        assert torch.allclose(cached[:, column], packed_values.double(), atol=1e-5, rtol=0)
        assert torch.allclose(cached[:, column], plain_values.double(), atol=1e-4, rtol=0)
    # real numbers: negative, and chosen != rejected (a wrong mask or a swapped column would show)
    assert (cached < 0).all() and not torch.allclose(cached[:, 0], cached[:, 1])


def _write_modified_copy(source, target):
    """A copy of the model folder with one tensor changed by 1e-3 (same names, shapes and file size)."""
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return name


def test_key_follows_the_weights_template_max_length_and_dtype(cfg, synth_world, tiny_model_dir, tmp_path):
    key = reference_key(tiny_model_dir, cfg, "float32")
    assert len(key) == 16 and int(key, 16) >= 0
    assert reference_key(tiny_model_dir, cfg, "float32") == key
    assert reference_key(shutil.copytree(tiny_model_dir, tmp_path / "identical"), cfg, "float32") == key

    _write_modified_copy(tiny_model_dir, tmp_path / "modified")
    assert (tmp_path / "modified" / "model.safetensors").stat().st_size == \
        (tiny_model_dir / "model.safetensors").stat().st_size
    changed = {
        "weights": reference_key(tmp_path / "modified", cfg, "float32"),
        "template": reference_key(tiny_model_dir, tiny_config(tmp_path, synth_world[0],
                                                               "model.train_template=llava_v1"), "float32"),
        "max_length": reference_key(tiny_model_dir, tiny_config(tmp_path, synth_world[0], "train.max_length=128"),
                                    "float32"),
        "dtype": reference_key(tiny_model_dir, cfg, "bfloat16"),
    }
    assert key not in changed.values() and len(set(changed.values())) == len(changed), changed
    # what does not change the numbers does not change the key
    assert reference_key(tiny_model_dir, tiny_config(tmp_path, synth_world[0], "train.beta=0.5",
                                                     "train.batch_size_per_worker=7"), "float32") == key


def test_large_files_are_fingerprinted_by_size_header_and_sampled_blocks(tmp_path):
    original = tmp_path / "big.safetensors"
    save_file({"tensor_a": torch.arange(6 << 20, dtype=torch.float32)}, original)  # 24 MiB
    size = original.stat().st_size
    limit = 1 << 20  # as if the file were a 14 GB shard
    digest = file_fingerprint(original, full_hash_limit=limit)
    assert digest.startswith("sampled:")
    assert file_fingerprint(original) == "sha256:" + file_sha256(original)  # under 64 MiB: hashed whole
    assert file_fingerprint(shutil.copy(original, tmp_path / "copy.safetensors"), full_hash_limit=limit) == digest

    data = bytearray(original.read_bytes())
    inside_a_sampled_block = sample_offsets(size)[7] + 12345
    data[inside_a_sampled_block] ^= 0xFF
    (tmp_path / "edited.safetensors").write_bytes(bytes(data))
    assert file_fingerprint(tmp_path / "edited.safetensors", full_hash_limit=limit) != digest
    # same bytes under another tensor name: only the header differs
    save_file({"tensor_b": torch.arange(6 << 20, dtype=torch.float32)}, tmp_path / "renamed.safetensors")
    assert (tmp_path / "renamed.safetensors").stat().st_size == size
    assert file_fingerprint(tmp_path / "renamed.safetensors", full_hash_limit=limit) != digest
    assert len(sample_offsets(size)) == 16 and sample_offsets(size)[-1] == size - (1 << 20)


def test_resume_computes_only_the_missing_sample_ids(first_pass, ray_session, cfg, rows, tiny_model_dir, tmp_path):
    source_root, first = first_pass
    root = tmp_path / "cache"
    shutil.copytree(source_root, root)
    cache = ReferenceCache(root / first.key, first.key)
    parts = cache.parts()
    assert len(parts) == 3  # 12 rows, 4 per part
    lost = pq.read_table(parts[1]).column("sample_id").to_pylist()
    parts[1].unlink()
    before = {part.name for part in cache.parts()}

    again = precompute_reference(cfg, tiny_model_dir, ray_session.data.from_items(rows), root, rows_per_part=4)
    assert again.path == cache.path
    assert again.counts == {"rows": 12, "cached": 12 - len(lost), "computed": len(lost), "errors": 0}
    new_parts = [part for part in again.parts() if part.name not in before]
    assert len(new_parts) == 1 and new_parts[0].name == "part-00003.parquet"  # numbered after, never over
    assert sorted(pq.read_table(new_parts[0]).column("sample_id").to_pylist()) == sorted(lost)
    assert again.load() == pytest.approx(first.load(), abs=1e-6)

    # everything cached: no pass, no new file
    files = {part.name: part.stat().st_mtime_ns for part in again.parts()}
    third = precompute_reference(cfg, tiny_model_dir, ray_session.data.from_items(rows), root, rows_per_part=4)
    assert third.counts == {"rows": 12, "cached": 12, "computed": 0, "errors": 0}
    assert {part.name: part.stat().st_mtime_ns for part in third.parts()} == files


def test_rows_with_bad_images_are_reported_kept_and_retried(ray_session, synth_world, rows, tiny_model_dir,
                                                          tmp_path):
    # 2 pairs per forward: the two bad pope copies (equal lengths) sort into one batch that collate_pairs
    # rejects whole; the bad copy of a description pair shares a batch with its good original
    cfg = tiny_config(tmp_path / "runs", synth_world[0], "train.batch_size_per_worker=2")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    missing, missing_desc = tmp_path / "later.jpg", tmp_path / "later-desc.jpg"
    good = [row for row in rows if row["source"] == "desc"][:3]
    pope = next(row for row in rows if row["source"] == "pope")
    bad = [dict(pope, sample_id="bad-missing", image=str(missing)),
           dict(pope, sample_id="bad-corrupt", image=str(corrupt)),
           dict(good[0], sample_id="bad-desc-missing", image=str(missing_desc))]
    dataset = ray_session.data.from_items(good + bad)

    cache = precompute_reference(cfg, tiny_model_dir, dataset, tmp_path / "cache", rows_per_part=100)
    assert cache.counts == {"rows": 6, "cached": 0, "computed": 6, "errors": 3}
    assert sorted(cache.load()) == sorted(ids(good))
    errors = cache.errors()
    assert sorted(errors) == ["bad-corrupt", "bad-desc-missing", "bad-missing"]
    assert errors["bad-missing"] == f"{missing}: file not found"  # from a batch collate_pairs rejected whole
    assert errors["bad-desc-missing"] == f"{missing_desc}: file not found"  # skipped from a scored batch
    assert errors["bad-corrupt"].startswith(f"{corrupt}: unreadable image")
    written = pq.read_table(cache.parts()[0]).to_pylist()
    assert len(written) == 6  # kept in the output, with NaN values
    assert all(math.isnan(row["ref_chosen"]) and math.isnan(row["ref_rejected"]) for row in written if row["error"])
    assert cache.coverage(ids(good + bad)) == (3, ["bad-missing", "bad-corrupt", "bad-desc-missing"])

    # an error is not a value: the next call tries those rows again, and a row whose image now opens gets one
    shutil.copy(good[0]["image"], missing_desc)
    again = precompute_reference(cfg, tiny_model_dir, dataset, tmp_path / "cache", rows_per_part=100)
    assert again.counts == {"rows": 6, "cached": 3, "computed": 3, "errors": 2}
    assert sorted(again.errors()) == ["bad-corrupt", "bad-missing"]
    values = again.load()
    assert values["bad-desc-missing"] == pytest.approx(values[str(good[0]["sample_id"])], abs=1e-5)
    assert len(again.table()) == 6  # one row per sample id, values preferred over old errors
