"""orchestrator.startup: the garbage collector paused for a start-up, and on again after it."""

import gc
import threading

from orchestrator.startup import collector_paused


def test_the_collector_is_off_inside_on_after_and_the_last_of_overlapping_blocks_turns_it_back_on():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still runs
    assert gc.isenabled()

    # two threads whose blocks overlap, the first ending first: the collector stays off until the second ends
    first_in, first_out, second_in = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with collector_paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with collector_paused():
            second_in.set()
            first_out.wait(5)
            seen["after the first ended"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"after the first ended": False} and gc.isenabled()


def test_a_collector_that_was_off_stays_off_and_an_error_inside_still_ends_the_pause():
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    try:
        with collector_paused():
            raise ValueError("the start-up failed")
    except ValueError:
        pass
    assert gc.isenabled()
