"""Ray job entrypoint: `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/export.py
RUN_DIR --out DIR [--merge] [--push-to-hub REPO_ID [--private]] [--config CONFIG] [--set KEY=VALUE]`.

The export runs in the job's driver. `--merge` holds the base model in float32 (~28 GB of memory for a 7B
model): give the driver a node with that much, e.g. `ray job submit --entrypoint-memory 40000000000 ...`.
For `--push-to-hub`, set `env.offline: false` and have the token variable (`export.hub_token_env`, default
HF_TOKEN) in the environment of the node the driver runs on; not in a runtime_env, whose variables are stored
with the job and shown on the dashboard.
"""

from _entry import run_passthrough

if __name__ == "__main__":
    run_passthrough(["export"])
