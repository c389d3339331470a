"""Training curves: wandb (from rank 0 only) and a parquet file that every logged step is appended to.

- The parquet lives at ``<run_dir>/train/<stage>_curves.parquet`` (columns: step, epoch, lr, loss,
  rewards/..., samples_per_s, time, ...). It is rewritten atomically at each log call (curves are
  small), and a resumed run first drops the rows after the step it resumes from, so the file always
  tells one consistent history. Rank 0 writes it: the run dir must be on a filesystem rank 0 can
  reach (a single node, or a shared mount on a cluster).
- wandb runs in the config's mode: `offline` (default) writes under ``<run_dir>/wandb``; `online`
  is used only when the environment variable *named* by `wandb.api_key_env` is set, else it falls
  back to offline with a warning; `disabled` skips wandb. The key is read from the environment of the
  process and handed to wandb in memory only: it is never logged, written or put in a config dump.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config import ExperimentConfig

log = logging.getLogger(__name__)


def curves_path(cfg: ExperimentConfig, stage: str) -> Path:
    return cfg.run_dir / "train" / f"{stage}_curves.parquet"


def timings_path(cfg: ExperimentConfig, stage: str) -> Path:
    """Rank 0's timing record of a stage's run (setup phases, step ends; see recipe._StepClock)."""
    return cfg.run_dir / "train" / f"{stage}_timings.json"


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(_uniform(self.rows))
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(self.path)


def _uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same keys in every row (missing -> None) with 'step' first, so columns line up."""
    keys: list[str] = ["step"]
    for row in rows:
        keys += [key for key in row if key not in keys]
    return [{key: _plain(row.get(key)) for key in keys} for row in rows]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class Tracker:
    """What rank 0 uses to log: `log(step, metrics)` goes to wandb (if on) and to the curves parquet."""

    def __init__(self, cfg: ExperimentConfig, stage: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.run = None
        self.curves: CurveLog | None = None
        if not enabled:
            return
        self.curves = CurveLog(curves_path(cfg, stage), resume_step)
        mode = wandb_mode(cfg)
        if mode != "disabled":
            self.run = _start_wandb(cfg, stage, mode)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics, "time": metrics.get("time", time.time())}
        self.curves.append(row)
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self.run, "dir", None) if self.run is not None else None


def _start_wandb(cfg: ExperimentConfig, stage: str, mode: str):
    import wandb

    cfg.run_dir.mkdir(parents=True, exist_ok=True)  # wandb writes <run_dir>/wandb/<run>/
    if mode == "online":
        # The key goes to wandb in memory; it is never printed or stored by us.
        wandb.login(key=os.environ[cfg.wandb.api_key_env], relogin=False)
    kwargs: dict[str, Any] = dict(
        project=cfg.wandb.project, name=f"{cfg.name}-{stage}", group=cfg.name, job_type=stage,
        dir=str(cfg.run_dir), mode=mode, config={"stage": stage, **cfg.model_dump(mode="json")},
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    if mode == "online":
        # Re-runs of the same experiment and stage continue one wandb run.
        kwargs.update(id=f"{cfg.name}-{stage}-{cfg.content_hash()[:8]}", resume="allow")
    return wandb.init(**kwargs)
