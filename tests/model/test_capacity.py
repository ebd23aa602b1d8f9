from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from mone.model.capacity import capacity_distribution, expert_counts, realised_capacity

GRID = [round(x, 3) for x in np.linspace(0.13, 0.99, 44)]


def slsqp(e_c: float, E: int = 4, beta: float = 10.0, delta: float = 2.0) -> np.ndarray:
    """Eq. 3 of the paper solved by a generic constrained solver."""
    w = np.array([1 / 2 ** (E - i) for i in range(1, E + 1)])
    inc = np.array([delta ** (i - 1) for i in range(1, E + 1)])

    def objective(c: np.ndarray) -> float:
        c = np.clip(c, 1e-12, 1)
        return -(inc @ c - beta * np.sum(c * np.log(c)))

    cons = [{"type": "eq", "fun": lambda c: c.sum() - 1}, {"type": "eq", "fun": lambda c: w @ c - e_c}]
    res = minimize(
        objective,
        np.full(E, 1 / E),
        method="SLSQP",
        bounds=[(0, 1)] * E,
        constraints=cons,
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("e_c", GRID)
def test_closed_form_matches_slsqp(e_c: float) -> None:
    np.testing.assert_allclose(capacity_distribution(e_c), slsqp(e_c), atol=1e-3)


def test_reference_table() -> None:
    # docs/model.md section 3.3
    table = {
        0.3: (0.414, 0.321, 0.194, 0.071),
        0.5: (0.227, 0.235, 0.251, 0.287),
        0.9: (0.022, 0.037, 0.105, 0.835),
    }
    for e_c, want in table.items():
        np.testing.assert_allclose(capacity_distribution(e_c), want, atol=1.5e-3)


@pytest.mark.parametrize("e_c", GRID)
def test_distribution_meets_constraints(e_c: float) -> None:
    c = capacity_distribution(e_c)
    assert math.isclose(sum(c), 1.0, abs_tol=1e-12)
    assert math.isclose(sum(ci / 2 ** (3 - i) for i, ci in enumerate(c)), e_c, abs_tol=1e-9)
    assert all(ci >= 0 for ci in c)


def test_end_points_are_exact() -> None:
    assert capacity_distribution(1.0) == (0.0, 0.0, 0.0, 1.0)
    assert capacity_distribution(0.125) == (1.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("N", [49, 196, 8])
@pytest.mark.parametrize("e_c", [0.125, 0.2, 0.3, 0.5, 0.77, 1.0])
def test_counts_floor_with_leftovers_on_smallest(N: int, e_c: float) -> None:
    c = capacity_distribution(e_c)
    k = expert_counts(e_c, N)
    assert sum(k) == N
    assert list(k[1:]) == [math.floor(cj * N + 1e-9) for cj in c[1:]]
    assert realised_capacity(k) <= e_c + 1e-9


def test_paper_flooring_example() -> None:
    # N=196 at e_c=0.3: k_4=13, k_3=38, k_2=62, k_1=83, realised 0.295 (docs/model.md section 3.3)
    assert expert_counts(0.3, 196) == (83, 62, 38, 13)
    assert realised_capacity((83, 62, 38, 13)) == pytest.approx(0.295, abs=5e-4)


@pytest.mark.parametrize("bad", [0.1, 1.01, -1, float("nan"), float("inf"), "0.5", True])
def test_bad_capacity_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="capacity"):
        capacity_distribution(bad)  # type: ignore[arg-type]
