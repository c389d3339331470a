"""cluster.yaml is what `ray up` reads: check what the launcher needs, and that it installs our exact pins."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _name(requirement: str) -> str:
    """Normalised distribution name of a requirement: "ray[default,train]==2.60.0" -> "ray"."""
    return re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_name(requirement): requirement.replace(" ", "") for requirement in project["dependencies"]}


def installed_requirements(commands: list[str]) -> dict[str, str]:
    """name -> requirement for every package a `pip install` in `commands` names (options skipped)."""
    found = {}
    for command in commands:
        for part in re.split(r"&&|;|\|\|", command):
            words = shlex.split(part)
            if "pip" not in " ".join(words[:2]) or "install" not in words:
                continue
            arguments = words[words.index("install") + 1:]
            skip_next = False
            for word in arguments:
                if skip_next:
                    skip_next = False
                elif word in ("--index-url", "--extra-index-url", "-i", "-r", "-c"):
                    skip_next = True
                elif not word.startswith("-"):
                    found[_name(word)] = word
    return found


def test_top_level_fields_the_launcher_needs(cluster):
    assert cluster["cluster_name"] == "hadpo"
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    assert cluster["provider"]["availability_zone"].startswith(cluster["provider"]["region"])
    assert isinstance(cluster["provider"]["cache_stopped_nodes"], bool)
    assert cluster["auth"]["ssh_user"] == "ubuntu"
    assert cluster["max_workers"] >= 1 and cluster["upscaling_speed"] > 0 and cluster["idle_timeout_minutes"] > 0
    # the code goes with `ray job submit --working-dir`; only the Ray auth token is copied
    assert cluster["file_mounts"] == {"/home/ubuntu/.ray/auth_token": "~/.ray/auth_token"}


def test_node_types_cpu_head_and_8_gpu_workers(cluster):
    types = cluster["available_node_types"]
    for name, node in types.items():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= node.keys(), name
        assert node["node_config"]["InstanceType"], name
        assert 0 <= node["min_workers"] <= node["max_workers"], name
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    gpu_types = [node for node in types.values() if node["resources"].get("GPU") == 8]
    assert gpu_types and all(node["node_config"]["InstanceType"] == "p4d.24xlarge" for node in gpu_types)
    assert sum(node["max_workers"] for node in gpu_types) <= cluster["max_workers"]


def test_start_commands(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "ray stop" in head and "ray stop" in worker
    assert "ray start --head --port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for commands in (head, worker):
        assert "NCCL_NVLS_ENABLE=0" in commands and "HF_HOME=/mnt/shared/" in commands


def test_shared_disk_is_mounted_where_the_7b_config_writes(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert re.search(r"mount -t nfs4 .* /mnt/shared\b", setup)
    experiment = yaml.safe_load((ROOT / "configs" / "llava15_7b_hadpo.yaml").read_text())
    assert experiment["output_root"].startswith("/mnt/shared/")
    assert experiment["env"]["hf_home"] == "/mnt/shared/hf" and "HF_HOME=/mnt/shared/hf" in setup


def test_setup_installs_exactly_the_pyproject_pins(cluster):
    pins = pyproject_pins()
    installed = installed_requirements(cluster["setup_commands"])
    for name in ("ray", "transformers", "peft", "deepspeed", "torch"):
        assert installed[name] == pins[name], name
    assert installed == pins          # every dependency, same specifier, nothing more


def test_torch_comes_from_a_cuda_index(cluster):
    torch_line = next(command for command in cluster["setup_commands"] if "torch==" in command)
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+", torch_line)


def test_validates_against_rays_own_schema(cluster):
    import jsonschema
    import ray.autoscaler

    schema_file = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if not schema_file.is_file():
        pytest.skip(f"this Ray has no {schema_file}")
    jsonschema.validate(cluster, json.loads(schema_file.read_text()))


def test_ray_accepts_it_after_filling_its_defaults(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["resources"]["GPU"] == 0


def test_token_authentication_on_every_node_with_the_launchers_own_token(cluster):
    raw = (ROOT / "cluster.yaml").read_text()
    # The token comes from the laptop's file; none is written here (no RAY_AUTH_TOKEN=<value>, no literal).
    assert "RAY_AUTH_TOKEN=" not in raw and not re.search(r"\b[0-9a-f]{32,}\b", raw)
    assert cluster["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cluster[key])
        assert "RAY_AUTH_MODE=token" in start, key
        # a node without the token stops before `ray start` with a message
        assert start.index("test -s ~/.ray/auth_token") < start.index("ray start"), key
    setup = " ".join(cluster["setup_commands"])
    assert "RAY_AUTH_MODE=token" in setup and "chmod 600 ~/.ray/auth_token" in setup
