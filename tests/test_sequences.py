import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.masks.windows import extension_plan, window_starts


def test_window_starts_and_errors():
    assert window_starts(10, 4) == [0, 4, 6]
    assert window_starts(8, 4, 2) == [0, 2, 4]
    with pytest.raises(ValueError, match="does not fit"):
        window_starts(3, 4)


@settings(max_examples=200, deadline=None)
@given(depth=st.integers(3, 60), data=st.data())
def test_extension_plan_covers_every_slice_once(depth, data):
    m = data.draw(st.integers(2, min(depth, 16)))
    n = data.draw(st.integers(1, m - 1))
    z0 = data.draw(st.integers(0, depth - m))
    plan = extension_plan(depth, m, n, z0)
    generated = []
    covered = set(range(z0, z0 + m))
    assert plan[0].start == z0 and plan[0].given == 0
    generated += list(range(z0, z0 + m))
    for step in plan[1:]:
        window = range(step.start, step.start + m)
        assert 0 <= step.start <= depth - m
        assert n <= step.given < m
        if step.direction == "forward":
            given, new = window[: step.given], window[step.given :]
        else:
            given, new = window[m - step.given :], window[: m - step.given]
        assert set(given) <= covered  # conditions come from slices that exist
        assert not set(new) & covered  # nothing is generated twice
        covered |= set(new)
        generated += list(new)
    assert sorted(generated) == list(range(depth))


def test_extension_plan_rejects_bad_arguments():
    with pytest.raises(ValueError):
        extension_plan(10, 4, 4, 0)
    with pytest.raises(ValueError, match="z0"):
        extension_plan(10, 4, 2, 7)
