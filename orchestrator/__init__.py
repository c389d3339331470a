"""hadpo-orchestrator: Ray-native HA-DPO experiments for LLaVA-style vision-language models.

The package in layers; a module imports only from its own layer and the layers listed before it
(`tests/test_layers.py` reads every import from the source and checks it):

- the bottom, shared by every layer: `files` (atomic writes, hashes), `timing` (clocks, durations),
  `versions` (package versions, git commit), `images` (opening an image), `paths` (paths kept inside their
  root), `layout` (what a run's stages are called and where each of its files lies), `errors`, `console`
  (what the terminal shows; the run's log file), `startup` (a worker's start-up with the garbage collector
  paused);
- `config` (the one typed experiment config), with `data.schema` (the uniform rows), `plan` (GPU memory
  planner), `resources` (can the cluster ever run this), `cluster` (the cluster launcher config's node
  types, and the same types on Ray's local autoscaler) and `ray_session` (starting and stopping Ray);
- `data` (readers, Ray datasets, the synthetic world) and `model` (LLaVA, LoRA, conversion);
- `train` (DPO and warm-up on Ray Train) and `eval` (POPE and MileBench on Ray Data); eval never
  imports train;
- `pipeline` (`hadpo run`: the stages with their records) and `tune` (Ray Tune sweeps);
- `report` (HTML and Markdown from the files runs left behind);
- the doors: `export` (adapter or merged model, model card, upload), `boundary` (the one error boundary)
  and `cli` (`hadpo`); the `ray job submit` entrypoints in ``jobs/`` call the CLI.
"""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("HADPO_WORKER_LOG_MARKS"):  # console.WORKER_LOG_MARKS: a worker of a command's local Ray
    from orchestrator.console import setup_worker_logging

    setup_worker_logging()
