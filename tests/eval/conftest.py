"""The synthetic world's POPE and MileBench rows, as the evaluation tests read them."""

import pytest

from orchestrator.data import formats


@pytest.fixture(scope="module")
def pope_rows(synth_world):
    """The world's adversarial POPE questions (6 per image)."""
    world, _ = synth_world
    return formats.read_pope_questions(world / "pope/coco_pope_adversarial.json", image_root=str(world / "coco/val2014"))


@pytest.fixture(scope="module")
def mile_rows(synth_world):
    """Every MileBench sample of the world (multi-image contexts with a choice list)."""
    world, _ = synth_world
    return [row for task_dir in sorted((world / "milebench").iterdir()) for row in formats.read_milebench_task(task_dir)]
