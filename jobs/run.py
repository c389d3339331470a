"""Ray job entrypoint: `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/run.py --config CONFIG`."""

from _entry import run

if __name__ == "__main__":
    run(["run"])
