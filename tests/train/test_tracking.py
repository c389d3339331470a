"""Training curves parquet and wandb settings (rank 0's tracker), without Ray."""

import pyarrow.parquet as pq

from orchestrator.config import config_from_dict
from orchestrator.layout import curves_path
from orchestrator.train.tracking import CurveLog, Tracker, wandb_mode


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
    assert pq.read_table(curves_path(cfg.run_dir, "dpo")).column("step").to_pylist() == [1, 2]
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


def test_tensorboard_and_mlflow_get_the_same_steps_and_a_resume_drops_the_redone_ones(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_from_dict({"name": "tb", "output_root": str(tmp_path), "tracking": ["tensorboard", "mlflow"],
                            "train": {"beta": 0.25}})
    first = Tracker(cfg, "dpo")
    for step in (1, 2, 3):
        first.log(step, {"loss": 1.0 / step, "rewards/accuracies": 0.5 + step / 10, "note": "text is skipped"})
    first.close()  # the run dies after step 3; its checkpoint was step 2
    resumed = Tracker(cfg, "dpo", resume_step=2)
    resumed.log(3, {"loss": 0.3, "rewards/accuracies": 0.9})
    resumed.log(4, {"loss": 0.2, "rewards/accuracies": 0.95})
    resumed.close()
    assert not (cfg.run_dir / "wandb").exists()

    # TensorBoard's own loader: the purge marker hides the first attempt's step 3
    events = EventAccumulator(str(cfg.tensorboard_dir / "dpo"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "rewards/accuracies"]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.3), (4, 0.2)]

    # MLflow's own FileStore reads the store back
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=cfg.mlflow_store.as_uri())
    experiment = client.get_experiment_by_name("tb")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tb-dpo" and run.info.status == "FINISHED"
    assert run.data.params["train.beta"] == "0.25" and run.data.tags["stage"] == "dpo"
    history = client.get_metric_history(run.info.run_id, "rewards/accuracies")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, 0.6), (2, 0.7), (3, 0.9), (4, 0.95)]
    assert run.data.metrics["loss"] == 0.2


def test_a_tracker_that_fails_to_start_fails_the_first_log_on_the_training_thread(tmp_path, monkeypatch):
    import pytest

    from orchestrator.train import tracking

    def refuse(*args, **kwargs):
        raise PermissionError("tensorboard folder is read-only")

    monkeypatch.setattr(tracking, "TensorBoardLog", refuse)
    cfg = config_from_dict({"name": "broken", "output_root": str(tmp_path), "tracking": ["tensorboard"]})
    tracker = Tracker(cfg, "dpo")  # starts beside the first steps: nothing raised yet
    with pytest.raises(PermissionError, match="read-only"):
        tracker.log(1, {"loss": 1.0})
    assert not curves_path(cfg.run_dir, "dpo").exists()  # the step that raised logged nothing
