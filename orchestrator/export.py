"""`hadpo export`: a run's LoRA adapter as something to hand on, with a model card and an optional upload.

What it writes into `out_dir`:
- without `merge`: the adapter in peft's layout (``adapter_config.json``, ``adapter_model.safetensors``),
  loadable with ``PeftModel.from_pretrained(base, out_dir)`` on the base model it was trained on;
- with `merge`: a complete transformers folder of the base's family (LLaVA-1.5 or LLaVA-NeXT in the llava-hf
  layout, Qwen2.5-VL; sharded safetensors, ``config.json``, the processing files, ``generation_config.json``)
  that plain ``AutoModelForImageTextToText.from_pretrained(out_dir)`` loads, and the unmerged adapter beside
  it in ``adapter/`` (not at the top level: transformers would then try to load the folder as an adapter).
  The processing files are the base's, read and written the family's way (`families.load_processing`: the
  processor for the LLaVA families; Qwen2.5-VL's tokenizer, image processor and chat template, since its
  processor class needs torchvision for video);
- ``README.md``, a model card naming the model family and the prompt template: the run's POPE / MileBench
  tables and its run record (base model, config, data-file hashes, package versions), rendered by
  `orchestrator.report`, nothing recomputed.

The merge loads the base in float32, adds the LoRA delta there (one rounding, when the result is cast to
`export.dtype`, by default the base's own dtype) and needs about 4 bytes per parameter of CPU memory
(~28 GB for LLaVA-1.5-7B).

The upload (`push_to_hub`) uses ``huggingface_hub``'s ``create_repo`` + ``upload_folder`` with the token
read from the environment variable that `export.hub_token_env` names; the token is passed to the API only,
never written. With `env.offline` true, or the token variable unset, it fails before any work is done.

Where the adapter comes from: a run folder's stage records (``<run_dir>/stages/<stage>.json``, written by
`orchestrator.pipeline`, whose training stages record ``outputs.adapter`` = `TrainResult.checkpoint_path`),
or an adapter / checkpoint folder named directly (`find_adapter`). The base model is the run record's
``base_model``, else the adapter's own ``base_model_name_or_path`` when that is a local folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestrator import layout
from orchestrator.config import ConfigError, ExperimentConfig
from orchestrator.model.adapter import ADAPTER_CONFIG, find_adapter
from orchestrator.report import load_run, run_summary_markdown

log = logging.getLogger("hadpo.export")

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MERGED_ADAPTER_DIR = "adapter"
CARD = "README.md"


@dataclass
class ExportSource:
    """What is exported: the adapter folder, the base model it was trained on, and the run it came from."""

    adapter: Path
    base_model: Path | None
    run_dir: Path | None = None
    stage: str | None = None       # the training stage whose adapter this is ("dpo", "dpo_seed2")


@dataclass
class ExportResult:
    out_dir: Path
    merged: bool
    source: ExportSource
    files: list[str] = field(default_factory=list)
    repo_url: str | None = None

    def summary(self) -> str:
        what = "merged model" if self.merged else "peft adapter"
        lines = [f"{what} exported to {self.out_dir} ({len(self.files)} files)", f"adapter: {self.source.adapter}",
                 f"base model: {self.source.base_model or '(unknown)'}"]
        if self.repo_url:
            lines.append(f"uploaded: {self.repo_url}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Where the adapter and its base model are


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def is_run_dir(path: Path) -> bool:
    return layout.run_record_path(path).is_file() or layout.stages_dir(path).is_dir()


def enclosing_run_dir(path: Path, levels: int = 5) -> Path | None:
    """The run folder an adapter lies in (``<run_dir>/train/<run>/<checkpoint>/adapter``), if any."""
    for parent in list(path.parents)[:levels]:
        if layout.run_record_path(parent).is_file():
            return parent
    return None


def trained_adapters(run_dir: Path) -> dict[str, str]:
    """Training stage name -> its recorded adapter path, from ``<run_dir>/stages/*.json``."""
    found = {}
    for stage, record_path in layout.stage_records(run_dir).items():
        adapter = (_read_json(record_path).get("outputs") or {}).get("adapter")
        if adapter:
            found[stage] = str(adapter)
    return found


def _local_adapter(recorded: str, where: str) -> Path:
    if "://" in recorded:
        raise ValueError(f"{where}: the adapter is at {recorded}; export reads local folders, copy it first")
    return find_adapter(recorded)


def resolve_source(path: str | Path, stage: str | None = None, base_model: str | Path | None = None) -> ExportSource:
    """The adapter to export from a run folder or an adapter/checkpoint folder, and its base model."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or adapter folder")
    if is_run_dir(path) and not (path / ADAPTER_CONFIG).is_file():
        run_dir = path
        adapters = trained_adapters(run_dir)
        if not adapters:
            raise FileNotFoundError(f"{run_dir}: no training stage in stages/*.json records an adapter "
                                    "(run `hadpo run`, or export the adapter folder itself)")
        if stage is None and len(adapters) > 1:
            raise ValueError(f"{run_dir}: several trained adapters ({', '.join(adapters)}); choose one with --stage")
        stage = stage or next(iter(adapters))
        if stage not in adapters:
            raise ValueError(f"{run_dir}: no stage {stage!r} with an adapter; there are: {', '.join(adapters)}")
        adapter = _local_adapter(adapters[stage], str(layout.stage_record_path(run_dir, stage)))
    else:
        adapter = find_adapter(path).resolve()
        run_dir = enclosing_run_dir(adapter)
        if run_dir is not None:
            stage = next((name for name, recorded in trained_adapters(run_dir).items()
                          if "://" not in recorded and Path(recorded).resolve() == adapter), None)
    return ExportSource(adapter=adapter.resolve(), base_model=_base_model(adapter, run_dir, base_model),
                        run_dir=run_dir, stage=stage)


def _base_model(adapter: Path, run_dir: Path | None, given: str | Path | None) -> Path | None:
    if given:
        return Path(given).expanduser().resolve()
    if run_dir is not None:
        record = layout.run_record_path(run_dir)
        recorded = _read_json(record).get("base_model") if record.is_file() else None
        if recorded:
            return Path(recorded).expanduser().resolve()
    recorded = _read_json(adapter / ADAPTER_CONFIG).get("base_model_name_or_path")
    if recorded and (Path(recorded).expanduser() / "config.json").is_file():
        return Path(recorded).expanduser().resolve()
    return None


# ----------------------------------------------------------------------------------------------
# The hub


def hub_token(config: ExperimentConfig) -> str:
    """The hub token from the environment variable `export.hub_token_env` names; checks offline mode first."""
    if config.env.offline:
        raise ConfigError("export --push-to-hub: env.offline is true, so the hub must not be reached; "
                          "set env.offline: false in the config (or --set env.offline=false) to upload")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError("export --push-to-hub: HF_HUB_OFFLINE is set in this environment; huggingface_hub "
                          "would refuse the upload. Unset it (env.offline: false is already set)")
    name = config.export.hub_token_env
    token = os.environ.get(name, "").strip()
    if not token:
        raise ConfigError(f"export --push-to-hub: the environment variable {name} (export.hub_token_env) "
                          "holding the hub token is not set")
    return token


def push_folder(folder: Path, repo_id: str, token: str, private: bool = False, endpoint: str | None = None,
                commit_message: str = "hadpo export") -> str:
    """Create the model repo if needed and upload `folder` to it; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message)
    return str(url)


# ----------------------------------------------------------------------------------------------
# Writing


def copy_adapter(adapter: Path, out_dir: Path, base_model_id: str | None = None) -> list[Path]:
    """The adapter's config and weights (not peft's auto-generated README) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = [adapter / name for name in ADAPTER_WEIGHT_FILES if (adapter / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{adapter}: no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)})")
    written = []
    for source in weights:
        written.append(Path(shutil.copy2(source, out_dir / source.name)))
    adapter_config = _read_json(adapter / ADAPTER_CONFIG)
    if base_model_id:  # so that AutoPeftModel* finds the base on the hub
        adapter_config["base_model_name_or_path"] = base_model_id
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return written + [out_dir / ADAPTER_CONFIG]


def merged_dtype(name: str, base_config: dict):
    """`export.dtype` as a torch dtype; `auto` = the dtype the base model's config records (else float32)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    recorded = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    return getattr(torch, str(recorded).replace("torch.", ""))


def merge_adapter(base_model: Path, adapter: Path, out_dir: Path, dtype: str = "auto",
                  max_shard_size: str = "5GB") -> None:
    """Base + adapter merged (in float32) and saved as a complete folder of the base's family, with the base's
    processing files."""
    # torch, peft and transformers only for a merge: an unmerged export and its card never load them
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from orchestrator.model.families import (FAMILIES, family_of, load_processing, read_chat_template,
                                             save_processing_files)

    family = FAMILIES[family_of(base_model)]  # a folder of no supported family is refused, naming its model_type
    target = merged_dtype(dtype, _read_json(base_model / "config.json"))
    model = AutoModelForImageTextToText.from_pretrained(str(base_model), dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.to(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    if not (out_dir / "generation_config.json").is_file():
        model.generation_config.save_pretrained(str(out_dir))
    processor, tokenizer, image_processor = load_processing(base_model, family)
    save_processing_files(out_dir, processor, tokenizer, image_processor,
                          read_chat_template(base_model, processor, tokenizer))
    log.info("merged %s into %s (%s, %s) -> %s", adapter, base_model, family.name,
             str(target).replace("torch.", ""), out_dir)


def matching_evaluations(run, source: ExportSource):
    """The run with only the evaluations that describe this adapter: the baseline and its own evaluation."""
    def evaluates_this_adapter(evaluation) -> bool:
        recorded = evaluation.info.get("adapter")
        if recorded and Path(recorded).resolve() == source.adapter:
            return True
        # a moved run folder: recorded paths are stale, fall back on the pipeline's stage names
        return bool(source.stage) and evaluation.stage == layout.evaluation_of(source.stage)

    kept = [e for e in run.evaluations if e.role == "before" or evaluates_this_adapter(e)]
    return dataclasses.replace(run, evaluations=kept)


def without_extra_env_values(run):
    """The run with `env.extra`'s values hidden: a card may be published, and that is where a user could
    have put something private."""
    config = run.record.get("config") or {}
    extra = (config.get("env") or {}).get("extra") or {}
    if not extra:
        return run
    hidden = {**config, "env": {**config["env"], "extra": {key: "(not shown)" for key in extra}}}
    return dataclasses.replace(run, record={**run.record, "config": hidden})


# config.json model_type -> how the card names the family (the families `families.FAMILIES` loads)
FAMILY_TITLES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "qwen2_5_vl": "Qwen2.5-VL"}
TEXT_TEMPLATES = ("v1", "llava_v1")   # HA-DPO's LLaVA-1.5 templates; "chat" is the model's own


def base_family(base_model: Path | None) -> str | None:
    """The base model's family (its config.json ``model_type``) when the folder is here and of a known family."""
    if base_model is None or not (base_model / "config.json").is_file():
        return None
    model_type = _read_json(base_model / "config.json").get("model_type")
    return model_type if model_type in FAMILY_TITLES else None


def run_templates(run_dir: Path | None) -> tuple[str | None, str | None]:
    """(train, eval) prompt templates the run's record says it used, or Nones."""
    record = layout.run_record_path(run_dir) if run_dir is not None else None
    if record is None or not record.is_file():
        return None, None
    model = (_read_json(record).get("config") or {}).get("model") or {}
    return model.get("train_template"), model.get("eval_template")


def prompt_lines(family: str | None, train_template: str | None, eval_template: str | None) -> list[str]:
    """How the model was prompted: HA-DPO's text templates or the model's own chat template. Without a run
    record, each family's usual templates (v1 / llava_v1 for LLaVA-1.5, chat for the others) are named."""
    recorded = train_template is not None
    if not recorded:
        train_template, eval_template = ("v1", "llava_v1") if family in (None, "llava") else ("chat", "chat")
    source = "the run's config below" if recorded else "the family's usual templates; no run record was found"
    if train_template in TEXT_TEMPLATES:
        return [f"Prompts: LLaVA-1.5's `USER: <image>\\n{{question}} ASSISTANT:` after the system prompt (HA-DPO "
                f"trains with the `{train_template}` template and evaluates POPE with `{eval_template}`: {source})."]
    lines = ["Prompts: the model's own chat template, one image entry before the question "
             f"(`processor.apply_chat_template(messages, add_generation_prompt=True)`; templates `{train_template}` "
             f"in training, `{eval_template}` in evaluation: {source})."]
    if family == "qwen2_5_vl":
        lines.append("Qwen2.5-VL's `AutoProcessor` needs torchvision (its video processor); `AutoTokenizer` and "
                     "`AutoImageProcessor` load the same folder without it.")
    return lines


def model_card(source: ExportSource, merged: bool, base_model_id: str | None = None,
               repo_id: str | None = None) -> str:
    """README.md: what the folder is (the model family), how to load and prompt it, and the run's results and
    record."""
    base_name = base_model_id or (str(source.base_model) if source.base_model else "(not recorded)")
    family = base_family(source.base_model)
    title = FAMILY_TITLES.get(family, "a vision-language model")
    front = {"library_name": "transformers" if merged else "peft", "pipeline_tag": "image-text-to-text",
             "tags": ([family] if family else []) + ["dpo", "ha-dpo", "hallucination", "lora", "hadpo-orchestrator"]}
    if base_model_id:  # the hub checks that base_model names a hub repo; a local path would be rejected
        front["base_model"] = base_model_id
    name = repo_id or (source.run_dir.name if source.run_dir else source.adapter.parent.name)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {name}: {title} with HA-DPO (hallucination-aware DPO)", ""]
    family_words = f"{title} (`model_type: {family}`)" if family else "model"
    if merged:
        lines += [f"The LoRA adapter trained by hadpo-orchestrator merged into the base model `{base_name}`: a "
                  f"complete {family_words}. The unmerged adapter is in `adapter/`.", "",
                  "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
                  f'model = AutoModelForImageTextToText.from_pretrained("{repo_id or "<this folder>"}")',
                  f'processor = AutoProcessor.from_pretrained("{repo_id or "<this folder>"}")', "```"]
    else:
        lines += [f"A LoRA adapter (peft) for the base model `{base_name}`"
                  + (f", a {family_words}" if family else "") + ", trained by hadpo-orchestrator.", "",
                  "```python", "from peft import PeftModel", "from transformers import AutoModelForImageTextToText", "",
                  f'base = AutoModelForImageTextToText.from_pretrained("{base_model_id or "<base model>"}")',
                  f'model = PeftModel.from_pretrained(base, "{repo_id or "<this folder>"}")', "```"]
    lines += [""] + prompt_lines(family, *run_templates(source.run_dir)) + [""]
    lines += ["## Results and run record", ""]
    if source.run_dir is None:
        lines.append(f"The adapter `{source.adapter}` was exported on its own: no run folder "
                     f"({layout.RUN_RECORD}) was found, so no evaluation or run record is shown.")
    else:
        run = without_extra_env_values(matching_evaluations(load_run(source.run_dir), source))
        lines.append(f"From the run `{source.run_dir.name}`" + (f", training stage `{source.stage}`" if source.stage
                                                                else "") + ": ✗ = base model, ✓ = with this adapter.")
        lines += ["", run_summary_markdown(run).strip()]
    return "\n".join(lines) + "\n"


def export_model(source: str | Path, out_dir: str | Path, config: ExperimentConfig, merge: bool = False,
                 push_to_hub: str | None = None, private: bool = False, stage: str | None = None,
                 base_model: str | Path | None = None, base_model_id: str | None = None) -> ExportResult:
    """Export an adapter (or run) to `out_dir`, merged or not, with a model card; optionally upload it.

    The folder is written under a temporary name beside `out_dir` and renamed when complete, so an
    interrupted export leaves no half folder; an existing non-empty `out_dir` is refused.
    """
    token = hub_token(config) if push_to_hub else None  # before any work: offline mode, missing token
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not empty; choose another --out or remove it")
    resolved = resolve_source(source, stage=stage, base_model=base_model)
    if merge and resolved.base_model is None:
        raise ValueError(f"{resolved.adapter}: the base model is not recorded (no run record, and the adapter's "
                         "base_model_name_or_path is no local folder); name it with --base-model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        if merge:
            merge_adapter(resolved.base_model, resolved.adapter, staging, config.export.dtype,
                          config.export.max_shard_size)
            copy_adapter(resolved.adapter, staging / MERGED_ADAPTER_DIR, base_model_id)
        else:
            copy_adapter(resolved.adapter, staging, base_model_id)
        (staging / CARD).write_text(model_card(resolved, merge, base_model_id, push_to_hub), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    result = ExportResult(out_dir=out_dir, merged=merge, source=resolved, files=files)
    if push_to_hub:
        result.repo_url = push_folder(out_dir, push_to_hub, token, private=private, endpoint=config.env.hf_endpoint,
                                      commit_message=f"hadpo export of {resolved.stage or resolved.adapter.name}")
        log.info("uploaded %s to %s", out_dir, result.repo_url)
    return result
