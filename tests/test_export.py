"""`hadpo export`: the tiny LLaVA with a random non-zero LoRA adapter, exported merged and unmerged and loaded back
by plain transformers / peft; the model card from a run folder; the upload against a stand-in for the hub API
(a cloud service cannot exist here); offline mode and a missing token fail before any work.

Tolerance of merged vs unmerged logits: float32, atol 1e-5, rtol 0 (the merged weight W + s·BA and the
unmerged path Wx + s·B(Ax) differ only by rounding; measured: max |difference| 3.7e-6 on logits up to 3.7 for
LLaVA-1.5, 2.4e-6 on logits up to 4.1 for LLaVA-NeXT, 3.5e-6 on logits up to 3.6 for Qwen2.5-VL). The tiny
LLaVA-NeXT and Qwen2.5-VL are exported merged the same way and prompted through their chat templates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from orchestrator.config import ConfigError, config_from_dict
from orchestrator.export import export_model, resolve_source
from tests.test_report import write_evaluation, write_stage

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_test_token_0123456789abcdef"


def random_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter on a tiny model with random, non-zero A and B (peft's init would make B zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from orchestrator.model.lora import lora_target_regex

    torch.manual_seed(5)
    base = AutoModelForImageTextToText.from_pretrained(str(model_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=lora_target_regex(["q_proj", "v_proj", "down_proj"])))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


def model_inputs(model_dir: Path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    image = Image.new("RGB", (48, 48), (10, 200, 30))
    image.paste((250, 20, 20), (0, 0, 24, 24))
    return processor(text="USER: <image>\nIs there a cat in the image? ASSISTANT:", images=image, return_tensors="pt")


def base_plus_adapter_logits(base_dir: Path, adapter: Path, inputs) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(str(base_dir)), str(adapter)).eval()
    with torch.no_grad():
        return model(**inputs).logits


def assert_merged_gives_base_plus_adapter_logits(merged_dir: Path, base_dir: Path, adapter: Path, inputs) -> None:
    """The merged folder, loaded by plain transformers, computes base + adapter (to ATOL), and the adapter
    changes the base's logits (so the comparison has teeth)."""
    from transformers import AutoModelForImageTextToText

    with torch.no_grad():
        ours = AutoModelForImageTextToText.from_pretrained(str(merged_dir)).eval()(**inputs).logits
        plain_base = AutoModelForImageTextToText.from_pretrained(str(base_dir)).eval()(**inputs).logits
    expected = base_plus_adapter_logits(base_dir, adapter, inputs)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert (expected - plain_base).abs().max() > 1e-2


def default_config(**sections):
    return config_from_dict(sections)


def test_merged_export_loads_with_plain_transformers_and_gives_base_plus_adapter_logits(tiny_model_dir, adapter_dir,
                                                                                         tmp_path):
    config = default_config(export={"max_shard_size": "200KB"})
    out = tmp_path / "merged"
    result = export_model(adapter_dir, out, config, merge=True, base_model=tiny_model_dir)
    assert result.merged and result.out_dir == out
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "processor_config.json",
                 "tokenizer.json", "README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded
    assert not (out / "adapter_config.json").exists()     # else transformers would load the folder as an adapter
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # the tiny base's own dtype

    inputs = model_inputs(tiny_model_dir)
    assert_merged_gives_base_plus_adapter_logits(out, tiny_model_dir, adapter_dir, inputs)
    torch.testing.assert_close(model_inputs(out)["input_ids"], inputs["input_ids"])  # the base's processor


def test_unmerged_export_is_a_peft_adapter_on_the_base(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "adapter-export"
    result = export_model(adapter_dir, out, default_config(), base_model=tiny_model_dir)
    assert not result.merged
    assert sorted(result.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    inputs = model_inputs(tiny_model_dir)
    torch.testing.assert_close(base_plus_adapter_logits(tiny_model_dir, out, inputs),
                               base_plus_adapter_logits(tiny_model_dir, adapter_dir, inputs), atol=0, rtol=0)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "exported on its own" in card


def test_base_model_id_goes_into_adapter_config_and_card(adapter_dir, tmp_path):
    out = tmp_path / "with-id"
    export_model(adapter_dir, out, default_config(), base_model_id="llava-hf/llava-1.5-7b-hf")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "llava-hf/llava-1.5-7b-hf"
    assert "base_model: llava-hf/llava-1.5-7b-hf" in (out / "README.md").read_text()


# ----------------------------------------------------------------------------------------------
# From a run folder: the adapter its stage records name, the card with its tables


def run_folder(root: Path, tiny_model_dir: Path, adapter_dir: Path, seeds: tuple[int, ...] = ()) -> Path:
    """A run folder as `run_pipeline` leaves it: stage records, evaluations, run record, config.yaml."""
    from orchestrator.config import dump_config

    run_dir = root / "runs" / "card"
    config = config_from_dict({"name": "card", "output_root": str(root / "runs"),
                               "env": {"extra": {"SOME_SERVICE_KEY": "private-value"}}})
    base = write_evaluation(run_dir, "baseline", "", {"random": 6, "popular": 8, "adversarial": 10},
                            {"random": 1, "popular": 1, "adversarial": 1}, mile_good=2)
    write_stage(run_dir, "eval_baseline", {"run_id": base.run_id, "metrics_path": str(base.metrics_path),
                                           "answers_dir": str(base.answers_dir)})
    for suffix in [""] if not seeds else [f"_seed{s}" for s in seeds]:
        adapter = run_dir / "train" / f"card-dpo{suffix}" / "checkpoint_000002" / "adapter"
        adapter.parent.mkdir(parents=True)
        shutil.copytree(adapter_dir, adapter)
        write_stage(run_dir, f"dpo{suffix}", {"adapter": str(adapter), "curves": "", "metrics": {}})
        after = write_evaluation(run_dir, "hadpo" + suffix, str(adapter), {"random": 2, "popular": 3, "adversarial": 4},
                                 {"random": 2, "popular": 2, "adversarial": 2}, mile_good=4)
        write_stage(run_dir, f"eval_hadpo{suffix}", {"run_id": after.run_id, "metrics_path": str(after.metrics_path),
                                                     "answers_dir": str(after.answers_dir)})
    (run_dir / "run_record.json").write_text(json.dumps({
        "name": "card", "config": config.model_dump(mode="json"), "config_hash": config.content_hash(),
        "git_sha": "abc123", "base_model": str(tiny_model_dir), "packages": {"torch": "2.13.0"},
        "data_files": {"hadpo_desc": "d" * 64, "pope_random": "e" * 64}}))
    dump_config(config, run_dir / "config.yaml")
    return run_dir


def test_export_from_a_run_folder_finds_its_adapter_and_writes_its_tables_into_the_card(tiny_model_dir, adapter_dir,
                                                                                       tmp_path):
    from orchestrator.cli import main

    run_dir = run_folder(tmp_path, tiny_model_dir, adapter_dir)
    out = tmp_path / "card-export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    source = resolve_source(run_dir)
    assert source.stage == "dpo" and source.base_model == tiny_model_dir.resolve()
    assert source.adapter == (run_dir / "train" / "card-dpo" / "checkpoint_000002" / "adapter").resolve()
    card = (out / "README.md").read_text()
    # POPE random after HA-DPO: 12 yes-questions with 2 answered no, 12 no-questions with 2 answered yes
    # (see tests/test_report.py): accuracy 20/24 = 83.33 %; before: 1 and 6 wrong -> 17/24 = 70.83 %
    assert "| 83.33 |" in card and "| 70.83 |" in card
    assert "### MileBench" in card
    assert str(tiny_model_dir.resolve()) in card                   # base model
    assert "d" * 64 in card and "pope_random" in card               # data versions
    assert "config (YAML)" in card and "hub_token_env: HF_TOKEN" in card  # the config, the variable's name only
    assert "published" not in card                                  # only our numbers
    assert "SOME_SERVICE_KEY" in card and "private-value" not in card  # env.extra values are not published


def test_run_with_several_seeds_needs_a_stage_and_the_card_shows_only_that_adapter(tiny_model_dir, adapter_dir,
                                                                                  tmp_path):
    run_dir = run_folder(tmp_path, tiny_model_dir, adapter_dir, seeds=(1, 2))
    with pytest.raises(ValueError, match="several trained adapters.*--stage"):
        resolve_source(run_dir)
    out = tmp_path / "seed2"
    result = export_model(run_dir, out, default_config(), stage="dpo_seed2")
    assert result.source.adapter.parts[-3] == "card-dpo_seed2"
    card = (out / "README.md").read_text()
    assert "mean ± std" not in card  # one adapter's evaluation, not the seeds' spread
    with pytest.raises(ValueError, match="no stage 'dpo_seed9'"):
        resolve_source(run_dir, stage="dpo_seed9")


def test_existing_output_folder_is_not_overwritten(adapter_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(adapter_dir, tmp_path / "taken", default_config())
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------
# The hub


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records what it is given (no network exists here)."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, endpoint=None, token=None, **kwargs):
        FakeHfApi.calls.append(("init", {"endpoint": endpoint, "token": token}))

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        FakeHfApi.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, "files": files}))


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return FakeHfApi


def test_push_to_hub_uploads_the_folder_with_the_token_from_the_named_variable(tiny_model_dir, adapter_dir,
                                                                               tmp_path, monkeypatch, fake_hub):
    monkeypatch.setenv("MY_HUB_TOKEN", SECRET)
    config = default_config(env={"offline": False, "hf_endpoint": "https://mirror.example"},
                            export={"hub_token_env": "MY_HUB_TOKEN", "max_shard_size": "200KB"})
    out = tmp_path / "pushed"
    result = export_model(adapter_dir, out, config, merge=True, base_model=tiny_model_dir,
                          push_to_hub="someone/tiny-hadpo", private=True)
    assert result.repo_url == "https://huggingface.co/someone/tiny-hadpo"
    calls = dict(fake_hub.calls)
    assert calls["init"] == {"endpoint": "https://mirror.example", "token": SECRET}
    assert calls["create_repo"] == {"repo_id": "someone/tiny-hadpo", "private": True, "exist_ok": True}
    assert calls["upload_folder"]["folder_path"] == str(out)
    assert calls["upload_folder"]["files"] == result.files and "README.md" in result.files
    for path in out.rglob("*"):  # the token is in no file written
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert "someone/tiny-hadpo" in (out / "README.md").read_text()


def test_offline_mode_refuses_the_upload_before_any_work(adapter_dir, tmp_path, monkeypatch, fake_hub):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="env.offline is true"):
        export_model(tmp_path / "does-not-exist", out, default_config(), push_to_hub="someone/x")  # offline: default
    assert not out.exists() and fake_hub.calls == []


def test_missing_token_refuses_the_upload_before_any_work(adapter_dir, tmp_path, monkeypatch, fake_hub):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="HF_TOKEN .*export.hub_token_env.* is not set"):
        export_model(adapter_dir, tmp_path / "never", default_config(env={"offline": False}), push_to_hub="someone/x")
    assert not (tmp_path / "never").exists() and fake_hub.calls == []


def test_cli_reports_offline_mode_as_a_config_error(adapter_dir, tmp_path, capsys):
    from orchestrator.cli import main

    assert main(["export", str(adapter_dir), "--out", str(tmp_path / "x"), "--push-to-hub", "someone/x"]) == 2
    assert "env.offline is true" in capsys.readouterr().err
    assert main(["export", str(adapter_dir), "--out", str(tmp_path / "y"), "--private"]) == 2
    assert "--private needs --push-to-hub" in capsys.readouterr().err


def test_job_entrypoint_runs_the_export(adapter_dir, tmp_path):
    out = tmp_path / "job-export"
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), str(adapter_dir), "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and "peft adapter exported" in done.stdout


# ----------------------------------------------------------------------------------------------
# Other model families: LLaVA-NeXT and Qwen2.5-VL


@pytest.fixture(scope="module")
def family_adapter(tiny_family_dir, tmp_path_factory):
    return random_adapter(tiny_family_dir, tmp_path_factory.mktemp("family-adapter") / "adapter")


def chat_inputs(model_dir: Path):
    """A chat-template prompt with one image, made by plain transformers from the folder's own files: the
    processor for LLaVA-NeXT; for Qwen2.5-VL (whose processor class needs torchvision) its tokenizer and image
    processor, each <|image_pad|> repeated once per merged 2x2 block of patches as its processor would."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    image = Image.new("RGB", (64, 40), (10, 200, 30))
    image.paste((250, 20, 20), (0, 0, 24, 24))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog in the image?"}]}]
    if json.loads((model_dir / "config.json").read_text())["model_type"] != "qwen2_5_vl":
        processor = AutoProcessor.from_pretrained(str(model_dir))
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        return processor(text=text, images=image, return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vision = AutoImageProcessor.from_pretrained(str(model_dir))(images=[image], return_tensors="pt")
    pads = int(vision["image_grid_thw"].prod()) // 4
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * pads), return_tensors="pt")
    return {**inputs, "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}


def test_merged_export_of_each_family_loads_with_plain_transformers_and_gives_base_plus_adapter_logits(
        tiny_family_dir, family_adapter, tmp_path):
    family = json.loads((tiny_family_dir / "config.json").read_text())["model_type"]
    out = tmp_path / "merged"
    export_model(family_adapter, out, default_config(export={"max_shard_size": "200KB"}), merge=True,
                 base_model=tiny_family_dir)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "adapter/adapter_model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    # the base's tokenizer settings, unchanged (the loader's left padding is not written into them); transformers
    # adds how it was loaded (is_local, local_files_only) to any tokenizer it saves again
    def tokenizer_settings(folder: Path) -> dict:
        saved = json.loads((folder / "tokenizer_config.json").read_text())
        return {key: value for key, value in saved.items() if key not in ("is_local", "local_files_only")}
    assert tokenizer_settings(out) == tokenizer_settings(tiny_family_dir)
    if family == "llava_next":  # the processor (image processor settings inside processor_config.json)
        assert (out / "processor_config.json").is_file()
    else:  # no processor class for Qwen2.5-VL: tokenizer, image processor and chat template
        assert (out / "preprocessor_config.json").is_file() and not (out / "processor_config.json").exists()
        assert json.loads((out / "chat_template.json").read_text())["chat_template"] == \
            json.loads((tiny_family_dir / "chat_template.json").read_text())["chat_template"]

    inputs = chat_inputs(tiny_family_dir)
    for name, tensor in chat_inputs(out).items():  # the exported folder makes the same inputs
        torch.testing.assert_close(tensor, inputs[name], atol=0, rtol=0)
    assert_merged_gives_base_plus_adapter_logits(out, tiny_family_dir, family_adapter, inputs)

    card = (out / "README.md").read_text()
    title = {"llava_next": "LLaVA-NeXT", "qwen2_5_vl": "Qwen2.5-VL"}[family]
    assert f": {title} with HA-DPO" in card and f"`model_type: {family}`" in card and f"- {family}" in card
    assert "the model's own chat template" in card and "USER: <image>" not in card


def test_card_of_a_llava_1_5_adapter_names_the_family_and_hadpo_templates(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "llava-card"
    export_model(adapter_dir, out, default_config(), base_model=tiny_model_dir)
    card = (out / "README.md").read_text()
    assert ": LLaVA-1.5 with HA-DPO" in card and "`model_type: llava`" in card
    assert "`v1` template" in card and "`llava_v1`" in card and "no run record was found" in card


def test_merging_onto_a_folder_of_no_supported_family_is_refused(adapter_dir, tmp_path):
    base = tmp_path / "other-model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(ValueError, match="model_type 'idefics3' is not a supported family"):
        export_model(adapter_dir, tmp_path / "never", default_config(), merge=True, base_model=base)
    assert not (tmp_path / "never").exists()
