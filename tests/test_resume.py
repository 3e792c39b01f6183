"""resume_plan: what a run does next from the step its checkpoint holds, every boundary."""
import pytest

from sbt_keras.errors import ConfigError
from sbt_keras.training.resume import Phase, resume_plan


def plan(start, history_rows=None, steps_per_epoch=10, epochs=3, block=5):
    rows = start // steps_per_epoch if history_rows is None else history_rows
    return resume_plan(start, steps_per_epoch=steps_per_epoch, epochs=epochs,
                       steps_per_execution=block, history_rows=rows)


def test_a_new_run_trains_every_epoch_from_batch_0():
    p = plan(0)
    assert p.phases == (Phase(0, 3, 0),)
    assert (p.initial_epoch, p.skip, p.history_rows, p.mid_epoch) == (0, 0, 0, False)


def test_an_epoch_end_resumes_at_the_next_epoch_keeping_its_rows():
    p = plan(10, history_rows=1)
    assert p.phases == (Phase(1, 3, 0),) and p.history_rows == 1 and not p.mid_epoch


def test_later_history_rows_are_redone():
    # history.csv may hold rows past the checkpoint (a kill between row and save)
    assert plan(10, history_rows=2).history_rows == 1


def test_mid_epoch_finishes_that_epoch_then_the_rest():
    p = plan(15, history_rows=1)
    assert p.phases == (Phase(1, 2, 5), Phase(2, 3, 0)) and p.mid_epoch


def test_mid_last_epoch_has_only_the_partial_phase():
    assert plan(25, history_rows=2).phases == (Phase(2, 3, 5),)


def test_a_finished_run_has_nothing_left():
    p = plan(30, history_rows=3)
    assert p.phases == () and p.initial_epoch == 3 and p.skip == 0


def test_a_checkpoint_inside_a_block_is_refused():
    with pytest.raises(ConfigError, match=r"step 13, inside a block of "
                                          r"--steps_per_execution=5; resume with a divisor "
                                          r"of 3"):
        plan(13, history_rows=1)


def test_missing_history_rows_are_inconsistent_records():
    with pytest.raises(RuntimeError, match="past epoch 2, but history.csv has 1 rows"):
        plan(20, history_rows=1)


@pytest.mark.parametrize("start", range(0, 31, 5))
def test_every_block_boundary_covers_each_remaining_step_once(start):
    p = plan(start)
    steps = [e * 10 + b for ph in p.phases for e in range(ph.first, ph.last)
             for b in range(ph.skip if e == ph.first else 0, 10)]
    assert steps == list(range(start, 30))


def test_negative_start_is_an_error():
    with pytest.raises(ValueError):
        plan(-5, history_rows=0)
