"""A failed model batch is retried item by item; what still fails becomes an error row, the rest an answer."""

import logging

import pytest

from orchestrator.retry import model_failure, run_batch_retrying_items


def _pass(items, bad):
    """Run `items` through a model that raises on any batch holding an item in `bad`."""
    calls, answers, errors = [], {}, {}

    def run(batch):
        calls.append(list(batch))
        if any(item in bad for item in batch):
            raise RuntimeError(f"cannot take {sorted(set(batch) & bad)}")
        answers.update({item: item * 10 for item in batch})

    def record_error(item, text):
        errors[item] = text

    run_batch_retrying_items(items, run, record_error, batch="reference batch", unit="row")
    return calls, answers, errors


def test_a_batch_that_runs_is_run_once():
    calls, answers, errors = _pass([1, 2, 3], bad=set())
    assert calls == [[1, 2, 3]] and answers == {1: 10, 2: 20, 3: 30} and errors == {}


def test_a_failed_batch_is_retried_item_by_item_and_only_the_bad_item_is_an_error(caplog):
    with caplog.at_level(logging.WARNING, logger="hadpo"):
        calls, answers, errors = _pass([1, 2, 3], bad={2})
    assert calls == [[1, 2, 3], [1], [2], [3]]
    assert answers == {1: 10, 3: 30}
    assert errors == {2: "model failed: RuntimeError: cannot take [2]"}
    assert "reference batch of 3 rows failed (cannot take [2]); retrying row by row" in caplog.text


def test_a_batch_of_one_is_not_run_twice():
    calls, answers, errors = _pass([7], bad={7})
    assert calls == [[7]] and answers == {}
    assert errors == {7: "model failed: RuntimeError: cannot take [7]"}


def test_no_items_runs_nothing():
    assert _pass([], bad=set()) == ([], {}, {})


def test_an_interrupt_is_not_turned_into_an_error_row():
    def run(batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch_retrying_items([1, 2], run, lambda item, text: None)


def test_model_failure_names_the_exception_type_and_message():
    assert model_failure(ValueError("prompt too long")) == "model failed: ValueError: prompt too long"
