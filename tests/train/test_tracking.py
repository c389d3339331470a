"""Training curves parquet and wandb settings (rank 0's tracker), without Ray."""

import pyarrow.parquet as pq

from orchestrator.config import config_from_dict
from orchestrator.train.tracking import CurveLog, Tracker, curves_path, wandb_mode


def test_curves_are_appended_and_a_resumed_run_drops_the_steps_after_its_checkpoint(tmp_path):
    path = tmp_path / "dpo_curves.parquet"
    log = CurveLog(path)
    for step in (2, 4, 6):
        log.append({"step": step, "loss": 1.0 / step})
    log.append({"step": 8, "loss": 0.1, "rewards/accuracies": 0.75})  # a new column appears
    table = pq.read_table(path)
    assert table.column("step").to_pylist() == [2, 4, 6, 8]
    assert table.column("rewards/accuracies").to_pylist() == [None, None, None, 0.75]

    resumed = CurveLog(path, resume_step=4)  # the run restarts from its step-4 checkpoint
    resumed.append({"step": 6, "loss": 0.2})
    assert pq.read_table(path).column("step").to_pylist() == [2, 4, 6]
    assert pq.read_table(path).column("loss").to_pylist()[-1] == 0.2


def test_online_wandb_without_the_key_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HADPO_TEST_WANDB_KEY", raising=False)
    cfg = config_from_dict({"output_root": str(tmp_path), "wandb": {"mode": "online",
                                                                     "api_key_env": "HADPO_TEST_WANDB_KEY"}})
    assert wandb_mode(cfg) == "offline"
    disabled = config_from_dict({"output_root": str(tmp_path), "wandb": {"mode": "disabled"}})
    assert wandb_mode(disabled) == "disabled"


def test_tracker_writes_curves_and_offline_wandb_without_leaking_the_key(tmp_path, monkeypatch):
    secret = "sekrit-key-0123456789"
    monkeypatch.setenv("HADPO_TEST_WANDB_KEY", secret)
    cfg = config_from_dict({"name": "track", "output_root": str(tmp_path),
                            "wandb": {"mode": "offline", "api_key_env": "HADPO_TEST_WANDB_KEY"}})
    tracker = Tracker(cfg, "dpo")
    tracker.log(1, {"loss": 0.69, "lr": 1e-4})
    tracker.log(2, {"loss": 0.68, "lr": 1e-4})
    tracker.close()
    assert pq.read_table(curves_path(cfg, "dpo")).column("step").to_pylist() == [1, 2]
    assert list((cfg.run_dir / "wandb").glob("offline-run-*"))
    for path in cfg.run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_tracker_on_other_ranks_writes_nothing(tmp_path):
    cfg = config_from_dict({"name": "quiet", "output_root": str(tmp_path)})
    tracker = Tracker(cfg, "dpo", enabled=False)
    tracker.log(1, {"loss": 1.0})
    tracker.close()
    assert not cfg.run_dir.exists()
