"""Training: DPO / supervised warm-up of LLaVA on Ray Train.

- `losses`: the objectives as pure functions (sequence log-probs, DPO sigmoid / IPO / hinge, LM loss).
- `collate`: dataset rows -> model inputs (chosen and rejected batched as 2B rows).
- `recipe`: `train_loop_per_worker`, the recipe every Ray Train worker runs.
- `trainer`: `run_training(cfg, stage)`, the driver that builds and runs the Ray Train job.
- `tracking`: rank 0's training curves: a parquet, wandb, TensorBoard event files, an MLflow file store.
"""
