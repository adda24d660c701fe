"""The Pareto front function: nothing on it is dominated, everything off it is."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.tuning import dominates, pareto_front

accuracy = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
points = st.lists(st.tuples(accuracy, accuracy), max_size=40)
# coarse grids make ties and duplicates common
grid_points = st.lists(
    st.tuples(st.integers(0, 4).map(lambda v: v / 4), st.integers(0, 4).map(lambda v: v / 4)),
    max_size=30,
)


def test_dominates_needs_one_strictly_better() -> None:
    assert dominates((0.9, 0.5), (0.8, 0.5))
    assert not dominates((0.9, 0.5), (0.9, 0.5))
    assert not dominates((0.9, 0.4), (0.8, 0.5))


def test_a_small_front() -> None:
    found = pareto_front([(0.98, 0.60), (0.97, 0.65), (0.96, 0.62), (0.99, 0.10), (0.98, 0.60)])
    assert found == [0, 1, 3, 4]  # (0.96, 0.62) is dominated by (0.97, 0.65); ties both stay


@settings(max_examples=150, deadline=None)
@given(st.one_of(points, grid_points))
def test_the_front_is_non_dominated_and_covers_the_rest(values: list[tuple[float, float]]) -> None:
    front = pareto_front(values)
    assert front == sorted(set(front))
    for i in front:  # no point of the list dominates a point of the front
        assert not any(dominates(other, values[i]) for other in values)
    for j in set(range(len(values))) - set(front):  # every other point is dominated by the front
        assert any(dominates(values[i], values[j]) for i in front)
    assert bool(front) == bool(values)
