"""Capacity distribution (MoNE Eq. 3) and per-expert token counts.

With delta = 2 the "incentive" term of Eq. 3 is constant on the feasible set, so its optimum is the
maximum-entropy distribution under the two linear constraints: c_i ∝ exp(mu * w_i) with w_i = d_i / D,
where mu solves sum_i c_i w_i = e_c (docs/model.md section 3.3).  f(mu) = sum_i c_i(mu) w_i is strictly
increasing (its derivative is the variance of w under c), so bisection finds mu to machine precision.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache


def expert_weights(num_experts: int) -> tuple[float, ...]:
    """w_i = d_i / D = 1 / 2**(E-i), smallest expert first."""
    return tuple(1.0 / 2 ** (num_experts - i) for i in range(1, num_experts + 1))


def check_capacity(e_c: float, num_experts: int = 4) -> float:
    """Return e_c as a float, or raise ValueError if it is outside [1/2**(E-1), 1]."""
    lo = 1.0 / float(2 ** (num_experts - 1))
    if isinstance(e_c, bool) or not isinstance(e_c, numbers.Real) or not math.isfinite(e_c):
        raise ValueError(f"capacity must be a finite number, got {type(e_c).__name__} {e_c!r:.40}")
    if not lo - 1e-9 <= e_c <= 1.0 + 1e-9:
        raise ValueError(f"capacity {e_c!r} is outside [{lo:g}, 1]")
    return min(max(float(e_c), lo), 1.0)


def _mean_width(mu: float, w: tuple[float, ...]) -> float:
    m = max(mu * wi for wi in w)
    p = [math.exp(mu * wi - m) for wi in w]
    return float(sum(pi * wi for pi, wi in zip(p, w, strict=True)) / sum(p))


def capacity_distribution(e_c: float, num_experts: int = 4) -> tuple[float, ...]:
    """Share of tokens c_1..c_E (smallest expert first) for effective capacity e_c, Eq. 3 in closed form.

    The end points are exact: e_c = 1 puts every token on the full expert, e_c = 1/2**(E-1) on the smallest.
    """
    return _distribution(check_capacity(e_c, num_experts), num_experts)


@lru_cache(maxsize=4096)
def _distribution(e_c: float, num_experts: int) -> tuple[float, ...]:
    w = expert_weights(num_experts)
    if num_experts == 1:
        return (1.0,)
    if e_c >= 1.0 - 1e-12:
        return (0.0,) * (num_experts - 1) + (1.0,)
    if e_c <= w[0] + 1e-12:
        return (1.0,) + (0.0,) * (num_experts - 1)
    lo, hi = -1.0, 1.0
    while _mean_width(lo, w) > e_c:
        lo *= 2.0
    while _mean_width(hi, w) < e_c:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _mean_width(mid, w) < e_c:
            lo = mid
        else:
            hi = mid
    mu = 0.5 * (lo + hi)
    m = max(mu * wi for wi in w)
    p = [math.exp(mu * wi - m) for wi in w]
    s = sum(p)
    return tuple(pi / s for pi in p)


def expert_counts(e_c: float, num_tokens: int, num_experts: int = 4) -> tuple[int, ...]:
    """Tokens per expert k_1..k_E for N tokens: k_j = floor(c_j N) for j >= 2, leftovers to the smallest.

    EPR (Algorithm 1) assigns floor(c_j N) tokens to each expert from the largest down; the tokens that
    flooring leaves over stay on expert 1, the default.
    """
    return _counts(check_capacity(e_c, num_experts), num_tokens, num_experts)


@lru_cache(maxsize=4096)
def _counts(e_c: float, num_tokens: int, num_experts: int) -> tuple[int, ...]:
    c = _distribution(e_c, num_experts)
    k = [math.floor(cj * num_tokens + 1e-9) for cj in c]
    k[0] = num_tokens - sum(k[1:])
    return tuple(k)


def realised_capacity(counts: tuple[int, ...] | list[int]) -> float:
    """e_c actually served by a token split: sum_j k_j d_j / (N D)."""
    w = expert_weights(len(counts))
    n = sum(counts)
    return sum(k * wi for k, wi in zip(counts, w, strict=True)) / n
