"""How `bench.serve` lays out its headline rounds: their length and the order of the contenders."""

from bench.serve import round_order, round_seconds


def test_a_round_covers_at_least_the_asked_batches() -> None:
    assert round_seconds(20.0, 12, 3.2) == 12 * 3.2  # compute-bound: a dozen dense batches
    assert round_seconds(20.0, 12, 0.06) == 20.0  # small model: the run length asked for


def test_every_other_round_runs_the_contenders_in_reverse() -> None:
    names = ["LitServe dense", "mone capacity 1.0", "mone capacity 0.5"]
    assert round_order(names, 0) == names
    assert round_order(names, 1) == names[::-1]
    assert round_order(names, 2) == names
    firsts = {round_order(names, r)[0] for r in range(4)}
    assert firsts == {"LitServe dense", "mone capacity 0.5"}
