"""Training: DPO / supervised warm-up of LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL on Ray Train.

- `losses`: the objectives as pure functions (sequence log-probs, DPO sigmoid / IPO / hinge, LM loss).
- `collate`: dataset rows -> model inputs (chosen and rejected batched as 2B rows).
- `pairs`: preference pairs as model inputs and their log-probs under a model.
- `recipe`: `train_loop_per_worker`, the recipe every Ray Train worker runs.
- `schedule`: what a stage trains with, its step counts, each rank's micro-batches in a seeded order.
- `engine`: DeepSpeed (ZeRO 0-3) and DDP behind one interface, with the optimizer and the schedule.
- `checkpoints`: what a checkpoint holds (save / restore), and the run's checkpoint folders: names,
  completion markers, the one to resume from.
- `reference_cache`: the reference model's log-probs, computed once in a Ray Data pass and cached.
- `trainer`: `run_training(cfg, stage)`, the driver that builds and runs the Ray Train job.
- `tracking`: rank 0's training curves: a parquet, wandb, TensorBoard event files, an MLflow file store.
"""
