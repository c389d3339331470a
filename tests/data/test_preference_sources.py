"""`data.preference` sources: TRL's and RLAIF-V's vision preference formats, HA-DPO as a source, mixing by weight,
errors that name file, record and field, embedded images, and the synthetic world's TRL file."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.config import ConfigError, config_from_dict
from orchestrator.data import datasets, formats
from orchestrator.data.schema import DataFormatError


def png_bytes(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def user(*content):
    return [{"role": "user", "content": list(content)}]


def assistant(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


IMAGE = {"type": "image"}


def text(value):
    return {"type": "text", "text": value}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_trl_conversational_rows_become_preference_rows_with_their_images(tmp_path):
    (tmp_path / "img").mkdir()
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"images": ["a.jpg"], "prompt": user(IMAGE, text("Is there a cat?")),
         "chosen": assistant("No."), "rejected": assistant("Yes.")},
        # two images, the second inside the text: the placeholders stay where the images are
        {"images": ["a.jpg", "sub/b.jpg"], "prompt": user(text("Compare"), IMAGE, text("with"), IMAGE),
         "chosen": assistant("Same."), "rejected": assistant("Different.")},
        # TRL's implicit prompt: chosen and rejected start with the same user turn
        {"image": "a.jpg", "chosen": user(IMAGE, text("Describe it.")) + assistant("A cup."),
         "rejected": user(IMAGE, text("Describe it.")) + assistant("A cup and a dog.")},
        # the standard (string) format with the placeholder written in the prompt
        {"images": ["a.jpg"], "prompt": "<image>\nWhat is shown?", "chosen": "A bowl.", "rejected": "A bus."},
    ])
    rows = formats.read_trl_preference(data, image_root=str(tmp_path / "img"), source="mine")
    root = (tmp_path / "img").resolve()
    assert [row["sample_id"] for row in rows] == ["mine:0-1", "mine:0-2", "mine:0-3", "mine:0-4"]
    assert rows[0]["prompt"] == "Is there a cat?" and rows[0]["images"] == [str(root / "a.jpg")]
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["source"]) == ("No.", "Yes.", "mine")
    assert rows[1]["prompt"] == "Compare\n<image>\nwith\n<image>"
    assert rows[1]["images"] == [str(root / "a.jpg"), str(root / "sub/b.jpg")] and rows[1]["image"] == rows[1]["images"][0]
    assert (rows[2]["prompt"], rows[2]["chosen"], rows[2]["rejected"]) == ("Describe it.", "A cup.", "A cup and a dog.")
    assert rows[3]["prompt"] == "What is shown?"


@pytest.mark.parametrize("record, field, expected", [
    ({"images": ["a.jpg"], "prompt": user({"type": "video"}, text("Q")), "chosen": "A", "rejected": "B"},
     "prompt[0].content[0].type", '"text" or "image"'),
    ({"images": ["a.jpg", "b.jpg"], "prompt": user(IMAGE, text("Q")), "chosen": "A", "rejected": "B"},
     "prompt", "one image entry per image (2 images)"),
    ({"images": ["../outside.jpg"], "prompt": "Q", "chosen": "A", "rejected": "B"}, "images[0]", "a path inside"),
    ({"images": ["a.jpg"], "prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
     "chosen[0].role", '"assistant"'),
    ({"images": ["a.jpg"], "prompt": "Q", "chosen": "A"}, "rejected", "a string or one assistant message, got nothing"),
    ({"images": ["a.jpg"], "prompt": "Q", "chosen": " ", "rejected": "B"}, "chosen", "a non-empty answer"),
    ({"images": [], "prompt": "Q", "chosen": "A", "rejected": "B"}, "images", "a non-empty list of images"),
])
def test_a_bad_trl_record_names_file_record_and_field(tmp_path, record, field, expected):
    good = {"images": ["a.jpg"], "prompt": "Q", "chosen": "A", "rejected": "B"}
    data = write_jsonl(tmp_path / "pairs.jsonl", [good, record])
    with pytest.raises(DataFormatError) as error:
        formats.read_trl_preference(data, image_root=str(tmp_path))
    assert (error.value.path, error.value.record, error.value.field) == (str(data), 2, field)
    assert expected in str(error.value)


def test_trl_parquet_with_embedded_image_bytes_is_written_once_under_its_hash(tmp_path):
    image = {"bytes": png_bytes(), "path": "cat.png"}
    table = pa.Table.from_pylist([
        {"images": [image], "prompt": user(IMAGE, text("Q1")), "chosen": assistant("A"), "rejected": assistant("B")},
        {"images": [image], "prompt": user(IMAGE, text("Q2")), "chosen": assistant("C"), "rejected": assistant("D")},
    ])
    pq.write_table(table, tmp_path / "train-00000.parquet")
    rows = formats.read_trl_preference(tmp_path, embedded_dir=tmp_path / "cache")  # a folder of shards
    assert rows[0]["image"] == rows[1]["image"] and len(list((tmp_path / "cache").rglob("*.img"))) == 1
    pq.write_table(table.slice(0, 1), tmp_path / "test-00000.parquet")  # another split beside it
    assert len(formats.read_trl_preference(tmp_path, embedded_dir=tmp_path / "cache")) == 3
    assert len(formats.read_trl_preference(tmp_path / "train-*.parquet", embedded_dir=tmp_path / "cache")) == 2
    assert Image.open(rows[0]["image"]).size == (8, 8)
    with pytest.raises(DataFormatError, match="record 0: field 'images\\[0\\].path': expected embedded image bytes"):
        pq.write_table(pa.Table.from_pylist([{"images": [{"bytes": None, "path": "cat.png"}], "prompt": "Q",
                                              "chosen": "A", "rejected": "B"}]), tmp_path / "train-00000.parquet")
        formats.read_trl_preference(tmp_path, embedded_dir=tmp_path / "cache")


def test_a_datasets_save_to_disk_folder_is_read_through_its_state_json(tmp_path):
    table = pa.Table.from_pylist([{"image": "a.jpg", "prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "dataset_info.json").write_text("{}")
    rows = formats.read_trl_preference(tmp_path, image_root=str(tmp_path))
    assert [(row["prompt"], row["chosen"]) for row in rows] == [("Q", "A")]


def rlaif_record(idx, **extra):
    return {"ds_name": "RLAIF-V", "image": {"bytes": png_bytes((10, 200, 10)), "path": None},
            "question": "What is in the image?", "chosen": "A tree.", "rejected": "A tree and a dog.",
            "origin_dataset": "VQAv2", "origin_split": "{}", "idx": idx, "image_path": "", **extra}


def test_rlaif_v_parquet_rows_with_embedded_images(tmp_path):
    pq.write_table(pa.Table.from_pylist([rlaif_record("7"), rlaif_record("8", question="Any dog?")]),
                   tmp_path / "RLAIF-V-Dataset_000.parquet")
    rows = formats.read_rlaif_v(tmp_path / "RLAIF-V-Dataset_000.parquet", source="rlaifv",
                                embedded_dir=tmp_path / "cache")
    assert [row["sample_id"] for row in rows] == ["rlaifv:7", "rlaifv:8"]
    assert rows[1]["prompt"] == "Any dog?" and rows[0]["image_id"] == "VQAv2"
    assert rows[0]["chosen"] == "A tree." and Image.open(rows[0]["image"]).getpixel((0, 0)) == (10, 200, 10)


def test_rlaif_v_errors_name_the_record_and_field(tmp_path):
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.Table.from_pylist([rlaif_record("1"), rlaif_record("1")]), path)
    with pytest.raises(DataFormatError, match="record 1: field 'idx': expected an idx used once"):
        formats.read_rlaif_v(path, embedded_dir=tmp_path / "cache")
    pq.write_table(pa.Table.from_pylist([rlaif_record("1"), rlaif_record("2", question="")]), path)
    with pytest.raises(DataFormatError, match="record 1: field 'question': expected a non-empty string"):
        formats.read_rlaif_v(path, embedded_dir=tmp_path / "cache")
    pq.write_table(pa.Table.from_pylist([rlaif_record("1", image=None, image_path="/etc/passwd")]), path)
    with pytest.raises(DataFormatError, match="field 'image_path': expected a path inside"):
        formats.read_rlaif_v(path, image_root=str(tmp_path))


def mixed_config(world, tmp_path, sources):
    return config_from_dict({"name": "mix", "output_root": str(tmp_path / "runs"),
                             "data": {"synthetic_dir": str(world), "preference": sources}})


def test_sources_are_mixed_by_weight_with_a_seeded_share_and_unique_ids(synth_world, tmp_path):
    world, manifest = synth_world
    config = mixed_config(world, tmp_path, [
        {"format": "hadpo", "path": str(world / "hadpo"), "image_root": str(world / "VG"), "name": "hadpo"},
        {"format": "trl", "path": str(world / "trl" / "preference.jsonl"), "image_root": str(world / "VG"),
         "weight": 1.5}])
    stats: dict = {}
    rows = datasets.preference_rows(config, stats)
    hadpo = [row for row in rows if row["sample_id"].startswith("hadpo:")]
    trl = [row for row in rows if row["sample_id"].startswith("trl-2:")]
    n_trl = manifest.counts["trl_pairs"]
    assert len(hadpo) == len(datasets.preference_rows(config_from_dict({"data": {
        "synthetic_dir": str(world)}, "output_root": str(tmp_path / "runs")})))  # the HA-DPO recipe's list
    assert len(trl) == n_trl + round(0.5 * n_trl)
    assert len({row["sample_id"] for row in rows}) == len(rows)
    assert all(row["images"] == [row["image"]] for row in rows)
    assert {row["source"] for row in hadpo} == {"hadpo/desc", "hadpo/pope"}
    assert [s["used"] for s in stats["sources"]] == [len(hadpo), len(trl)]
    assert datasets.preference_rows(config) == rows  # seeded
    # the TRL file holds the world's pope pairs as the HA-DPO file does
    pope = {(r["image"], r["prompt"], r["chosen"], r["rejected"]) for r in hadpo if r["source"] == "hadpo/pope"}
    assert pope <= {(r["image"], r["prompt"], r["chosen"], r["rejected"]) for r in trl}


def test_weighted_rows_repeat_the_whole_part_and_draw_the_fraction():
    rows = [{"sample_id": f"s{i}"} for i in range(4)]
    assert [r["sample_id"] for r in datasets.weighted_rows(rows, 2.0, seed=0)] == \
        ["s0", "s1", "s2", "s3", "s0#1", "s1#1", "s2#1", "s3#1"]
    half = datasets.weighted_rows(rows, 0.5, seed=0)
    assert len(half) == 2 and {r["sample_id"] for r in half} < {"s0", "s1", "s2", "s3"}
    assert half == datasets.weighted_rows(rows, 0.5, seed=0) and len(datasets.weighted_rows(rows, 1.25, 1)) == 5


def test_source_settings_that_cannot_work_fail_at_load(tmp_path):
    with pytest.raises(ConfigError, match="use one"):
        config_from_dict({"data": {"hadpo_desc": "d.json", "preference": [{"format": "trl", "path": "p"}]}})
    with pytest.raises(ConfigError, match="needs image_root"):
        config_from_dict({"data": {"preference": [{"format": "hadpo", "path": "p"}]}})
    with pytest.raises(ConfigError, match="\\['x'\\] repeats"):
        config_from_dict({"data": {"preference": [{"format": "trl", "path": "p", "name": "x"},
                                                  {"format": "rlaif_v", "path": "q", "name": "x"}]}})
    with pytest.raises(ConfigError, match="weight: Input should be greater than 0"):
        config_from_dict({"data": {"preference": [{"format": "trl", "path": "p", "weight": 0}]}})


@pytest.mark.slow
def test_data_check_summarises_each_source_and_counts_bad_embedded_images_as_rejects(
        ray_session, synth_world, tmp_path, capsys):
    from orchestrator.cli import main

    world, _ = synth_world
    shard = tmp_path / "rlaif.parquet"
    pq.write_table(pa.Table.from_pylist([rlaif_record("1"), rlaif_record("2", image={"bytes": b"not an image",
                                                                                    "path": None})]), shard)
    config = tmp_path / "mix.yaml"
    config.write_text(json.dumps({"name": "mix", "output_root": str(tmp_path / "runs"), "data": {
        "synthetic_dir": str(world), "preference": [
            {"format": "trl", "path": str(world / "trl" / "preference.jsonl"), "image_root": str(world / "VG"),
             "name": "synth", "weight": 0.5},
            {"format": "rlaif_v", "path": str(shard), "name": "rlaifv"}]}}))
    assert main(["data", "check", str(config)]) == 0
    assert ray_session.is_initialized()  # the command stops only a Ray it started itself
    out = capsys.readouterr().out
    assert "source rlaifv (rlaif_v, " in out and "2 rows, weight 1 -> 2 used, 1 rejected" in out
    assert "source synth (trl, " in out and " 0 rejected" in out.split("source synth")[1].splitlines()[0]
    rejects = pq.read_table(tmp_path / "runs" / "mix" / "data" / "rejects-preference.parquet").to_pylist()
    assert len(rejects) == 1 and rejects[0]["sample_id"].startswith("rlaifv:2@")
    assert "unreadable image" in rejects[0]["error"]
