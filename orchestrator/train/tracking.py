"""Training curves from rank 0: a parquet file that every logged step is appended to, and the trackers the
config's `tracking` list names (wandb, TensorBoard, MLflow), all given the same metrics at the same step.

- The parquet lives at ``<run_dir>/train/<stage>_curves.parquet`` (columns: step, epoch, lr, loss,
  rewards/..., samples_per_s, time, ...). It is rewritten atomically at each log call (curves are
  small), and a resumed run first drops the rows after the step it resumes from, so the file always
  tells one consistent history. Rank 0 writes it: the run dir must be on a filesystem rank 0 can
  reach (a single node, or a shared mount on a cluster).
- wandb runs in the config's mode: `offline` (default) writes under ``<run_dir>/wandb``; `online`
  is used only when the environment variable *named* by `wandb.api_key_env` is set, else it falls
  back to offline with a warning; `disabled` skips wandb. The key is read from the environment of the
  process and handed to wandb in memory only: it is never logged, written or put in a config dump.
- TensorBoard: event files under ``<run_dir>/tensorboard/<stage>/`` written by tensorboardX (it comes
  with Ray); a resumed run writes a purge marker at its resume step, so TensorBoard hides the steps the
  run redoes. View with ``tensorboard --logdir <run_dir>/tensorboard`` (or the output root, for all runs
  and sweep trials at once).
- MLflow: an MLflow *file store* (``<run_dir>/mlruns`` or `mlflow.store`), written here as files (one
  ``metrics/<key>`` file of "timestamp value step" lines per metric, ``params/``, ``tags/``, ``meta.yaml``),
  the layout of MLflow's own FileStore, so no MLflow package or server is needed to train. The experiment
  and run ids are derived from the names (experiment = `mlflow.experiment` or the config's name, run =
  ``<name>-<stage>``), so a re-run or a resume continues the same MLflow run; like the parquet, a resumed
  run first drops the lines after its resume step. MLflow 3 reads a file store only with
  ``MLFLOW_ALLOW_FILE_STORE=true`` (the format is frozen there, in "maintenance mode"):
  ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <run_dir>/mlruns``, or
  ``mlflow migrate-filestore`` into a database. Concurrent writers (sweep trials sharing one store) each
  write their own run folder; the experiment's meta.yaml is written atomically with the same content.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import layout
from orchestrator.config import ExperimentConfig
from orchestrator.files import atomic_write

log = logging.getLogger(__name__)


def wandb_mode(cfg: ExperimentConfig) -> str:
    """The mode wandb will really run in: online needs the key's env var, else offline."""
    mode = cfg.wandb.mode
    if mode == "online" and not os.environ.get(cfg.wandb.api_key_env):
        log.warning("wandb.mode is online but $%s is not set: logging offline instead", cfg.wandb.api_key_env)
        return "offline"
    return mode


class CurveLog:
    """Rows of logged metrics kept in memory and mirrored to a parquet file after each `append`."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            previous = pq.read_table(self.path).to_pylist()
            self.rows = [row for row in previous if row.get("step", 0) <= resume_step]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        table = pa.Table.from_pylist(_uniform(self.rows))
        atomic_write(self.path, lambda temp: pq.write_table(table, temp))


def _uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same keys in every row (missing -> None) with 'step' first, so columns line up."""
    keys: list[str] = ["step"]
    for row in rows:
        keys += [key for key in row if key not in keys]
    return [{key: _plain(row.get(key)) for key in keys} for row in rows]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class Tracker:
    """What rank 0 uses to log: `log(step, metrics)` goes to the curves parquet and every configured tracker."""

    def __init__(self, cfg: ExperimentConfig, stage: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.run = None  # the wandb run, when wandb is on
        self.curves: CurveLog | None = None
        self.tensorboard: TensorBoardLog | None = None
        self.mlflow: MlflowFileRun | None = None
        self._starting: threading.Thread | None = None
        self._start_error: BaseException | None = None
        if not enabled:
            return
        self.curves = CurveLog(layout.curves_path(cfg.run_dir, stage), resume_step)
        # The trackers start beside the first steps (importing tensorboardX and wandb and starting wandb's
        # service took ~2 s of every training stage's set-up); the first `log` waits for them, and a tracker
        # that failed to start fails it.
        self._starting = threading.Thread(target=self._start, args=(cfg, stage, resume_step), name="trackers-start",
                                          daemon=True)
        self._starting.start()

    def _start(self, cfg: ExperimentConfig, stage: str, resume_step: int) -> None:
        try:
            if "tensorboard" in cfg.tracking:
                self.tensorboard = TensorBoardLog(cfg.tensorboard_dir / stage, resume_step)
            if "mlflow" in cfg.tracking:
                self.mlflow = MlflowFileRun(cfg.mlflow_store, cfg.mlflow.experiment or cfg.name,
                                            layout.train_run_name(cfg.name, stage), resume_step)
                self.mlflow.log_params(flat_params(cfg.model_dump(mode="json")))
                self.mlflow.set_tags({"stage": stage, "config_hash": cfg.content_hash()})
            mode = wandb_mode(cfg) if "wandb" in cfg.tracking else "disabled"
            if mode != "disabled":
                self.run = _start_wandb(cfg, stage, mode)
        except BaseException as error:  # noqa: BLE001 - raised on the training thread by `started`
            self._start_error = error

    def started(self) -> None:
        """Wait until the trackers have started; raise what stopped one from starting."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            raise error

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.started()
        row = {"step": step, **metrics, "time": metrics.get("time", time.time())}
        self.curves.append(row)
        scalars = numeric_metrics(row)
        if self.tensorboard is not None:
            self.tensorboard.log(step, scalars, row["time"])
        if self.mlflow is not None:
            self.mlflow.log(step, scalars, row["time"])
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.started()
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def close(self) -> None:
        self.started()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.mlflow is not None:
            self.mlflow.finish()
            self.mlflow = None
        if self.run is not None:
            self.run.finish()
            self.run = None

    @property
    def wandb_dir(self) -> str | None:
        self.started()
        return getattr(self.run, "dir", None) if self.run is not None else None


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a logged row (step and wall time left out): what TensorBoard and MLflow plot."""
    out = {}
    for key, value in row.items():
        value = _plain(value)
        if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text (lists as their YAML flow form)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
    return out


class TensorBoardLog:
    """Scalars into TensorBoard event files (tensorboardX), one folder per stage."""

    def __init__(self, folder: Path, resume_step: int = 0):
        from tensorboardX import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard discards the events of steps >= it from earlier files (a resumed run
        # redoes them); a fresh run (resume_step 0) hides all of an earlier run's steps.
        # The file name holds the second it was opened; the nanosecond suffix keeps two files opened in the
        # same second (a quick restart) apart and in order (TensorBoard reads files in name order).
        self.writer = SummaryWriter(logdir=str(folder), purge_step=resume_step + 1, flush_secs=30,
                                    filename_suffix=f".{time.time_ns()}")

    def log(self, step: int, scalars: dict[str, float], wall_time: float) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=wall_time)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _stable_id(text: str, digits: bool = False) -> str:
    digest = hashlib.sha256(text.encode()).hexdigest()
    return str(int(digest[:15], 16)) if digits else digest[:32]


class MlflowFileRun:
    """One run in an MLflow file store, written in MLflow FileStore's layout (see the module docstring).

    ``<store>/<experiment id>/meta.yaml``, ``<store>/<experiment id>/<run id>/{meta.yaml, metrics/<key>,
    params/<key>, tags/<key>, artifacts/}``. Status: RUNNING (1) until `finish` sets FINISHED (3).
    """

    RUNNING, FINISHED = 1, 3

    def __init__(self, store: Path, experiment: str, run_name: str, resume_step: int = 0):
        self.store = Path(store)
        self.experiment_id = _stable_id(f"experiment:{experiment}", digits=True)
        self.run_id = _stable_id(f"run:{experiment}/{run_name}")
        experiment_dir = self.store / self.experiment_id
        self.run_dir = experiment_dir / self.run_id
        now = _millis(time.time())
        if not (self.store / "0" / "meta.yaml").is_file():  # MLflow expects its default experiment
            self._write_yaml(self.store / "0" / "meta.yaml", self._experiment_meta("0", "Default", now))
        if not (experiment_dir / "meta.yaml").is_file():
            self._write_yaml(experiment_dir / "meta.yaml", self._experiment_meta(self.experiment_id, experiment, now))
        meta_path = self.run_dir / "meta.yaml"
        started = yaml.safe_load(meta_path.read_text()).get("start_time", now) if meta_path.is_file() else now
        for sub in ("metrics", "params", "tags", "artifacts"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self._meta = {
            "artifact_uri": (self.run_dir / "artifacts").as_uri(), "end_time": None, "entry_point_name": "",
            "experiment_id": self.experiment_id, "lifecycle_stage": "active", "run_id": self.run_id,
            "run_name": run_name, "run_uuid": self.run_id, "source_name": "", "source_type": 4,
            "source_version": "", "start_time": started, "status": self.RUNNING, "tags": [], "user_id": "hadpo",
            "deleted_time": None,
        }
        self._write_yaml(meta_path, self._meta)
        self.set_tags({"mlflow.runName": run_name})
        self._drop_after(resume_step)

    @staticmethod
    def _experiment_meta(experiment_id: str, name: str, now: int) -> dict[str, Any]:
        return {"artifact_location": "", "creation_time": now, "experiment_id": experiment_id,
                "last_update_time": now, "lifecycle_stage": "active", "name": name}

    @staticmethod
    def _write_yaml(path: Path, data: dict[str, Any]) -> None:
        atomic_write(path, lambda temp: temp.write_text(yaml.safe_dump(data, sort_keys=True)))

    def _drop_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: forget the lines logged for them."""
        for path in (self.run_dir / "metrics").rglob("*"):
            if not path.is_file():
                continue
            kept = [line for line in path.read_text().splitlines() if line and int(line.split()[2]) <= step]
            if kept:
                path.write_text("".join(line + "\n" for line in kept))
            else:
                path.unlink()

    def _file(self, kind: str, key: str) -> Path:
        # MLflow keys may hold "/" (rewards/accuracies): nested files, as MLflow's FileStore writes them.
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"MLflow key {key!r}: empty, '.' or '..' path parts are not allowed")
        return self.run_dir / kind / Path(*parts)

    def log(self, step: int, scalars: dict[str, float], wall_time: float) -> None:
        stamp = _millis(wall_time)
        for key, value in scalars.items():
            path = self._file("metrics", key)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write(f"{stamp} {value!r} {step}\n")

    def log_params(self, params: dict[str, str]) -> None:
        """Params are fixed per run (MLflow refuses to change one): a resumed run rewrites the same values."""
        for key, value in params.items():
            path = self._file("params", key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(value))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            path = self._file("tags", key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(value))

    def finish(self) -> None:
        self._meta.update(status=self.FINISHED, end_time=_millis(time.time()))
        self._write_yaml(self.run_dir / "meta.yaml", self._meta)


def _millis(seconds: float) -> int:
    return int(round(seconds * 1000))


def _start_wandb(cfg: ExperimentConfig, stage: str, mode: str):
    import wandb

    cfg.run_dir.mkdir(parents=True, exist_ok=True)  # wandb writes <run_dir>/wandb/<run>/
    if mode == "online":
        # The key goes to wandb in memory; it is never printed or stored by us.
        wandb.login(key=os.environ[cfg.wandb.api_key_env], relogin=False)
    kwargs: dict[str, Any] = dict(
        project=cfg.wandb.project, name=layout.train_run_name(cfg.name, stage), group=cfg.name, job_type=stage,
        dir=str(cfg.run_dir), mode=mode, config={"stage": stage, **cfg.model_dump(mode="json")},
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    if mode == "online":
        # Re-runs of the same experiment and stage continue one wandb run.
        kwargs.update(id=f"{cfg.name}-{stage}-{cfg.content_hash()[:8]}", resume="allow")
    return wandb.init(**kwargs)
