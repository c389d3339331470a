"""The schedule: what a stage trains with, step counts, data order and resume position."""

import pytest

from orchestrator.config import TrainConfig
from orchestrator.train.schedule import epoch_order, micro_batches, plan_schedule, stage_plan

ROWS = [{"sample_id": f"s{i:03d}", "x": i} for i in range(50)]


def _train(**fields):
    return TrainConfig(batch_size_per_worker=4, gradient_accumulation=2, **fields)


def _take(iterator, micro_batches):
    """The row values of the next `micro_batches` micro-batches, flattened."""
    return [x for _ in range(micro_batches) for x in next(iterator)["x"]]


def test_schedule_counts_whole_optimizer_steps_per_rank():
    train = _train(epochs=1.5)
    schedule = plan_schedule(len(ROWS), 2, train, stage_plan(train, "dpo"))
    # 25 rows per rank -> 6 micro-batches of 4 -> 3 optimizer steps of 2 micro-batches; 1.5 epochs -> 5 steps
    assert (schedule.rows_per_rank, schedule.micro_per_epoch, schedule.steps_per_epoch) == (25, 6, 3)
    assert schedule.total_steps == 5
    assert schedule.position(4, train.gradient_accumulation) == (1, 2)  # step 5 starts at epoch 1, micro 2
    assert plan_schedule(len(ROWS), 2, _train(max_steps=7), stage_plan(_train(max_steps=7), "dpo")).total_steps == 7


def test_too_little_data_for_one_step_is_an_error_that_says_what_to_change():
    train = _train()
    with pytest.raises(ValueError, match="cannot fill one optimizer step.*batch_size_per_worker"):
        plan_schedule(10, 2, train, stage_plan(train, "dpo"))


def test_ranks_share_each_epoch_without_overlap_and_epochs_reshuffle():
    train = _train()
    schedule = plan_schedule(len(ROWS), 2, train, stage_plan(train, "dpo"))
    per_rank = [_take(micro_batches(ROWS, schedule, train, rank, 2, 0), 2 * schedule.micro_per_epoch)
                for rank in (0, 1)]
    first_epoch = [x for rows in per_rank for x in rows[:24]]
    assert len(set(first_epoch)) == 48  # 2 ranks x 6 micro-batches x 4 rows, no row twice
    assert per_rank[0][:24] != per_rank[0][24:]  # the second epoch has another order
    assert epoch_order(50, 42, 0) != epoch_order(50, 42, 1)
    assert epoch_order(50, 42, 0) == epoch_order(50, 42, 0)


def test_a_resumed_stream_continues_with_exactly_the_next_micro_batch():
    train = _train()
    schedule = plan_schedule(len(ROWS), 2, train, stage_plan(train, "dpo"))
    whole = _take(micro_batches(ROWS, schedule, train, 1, 2, 0), 12)  # two epochs of 6 micro-batches
    resumed = _take(micro_batches(ROWS, schedule, train, 1, 2, start_step=4), 4)
    assert resumed == whole[8 * 4:]  # 4 steps x 2 micro-batches already done; crosses into epoch 1


def test_sft_stage_uses_its_own_learning_rate_and_full_finetune_by_default():
    train = TrainConfig(learning_rate=2e-6)
    plan = stage_plan(train, "sft")
    assert not plan.lora and plan.learning_rate == train.sft.learning_rate
    assert stage_plan(train, "dpo").lora and stage_plan(train, "dpo").learning_rate == 2e-6
    with pytest.raises(ValueError, match="unknown training stage"):
        stage_plan(train, "ppo")
