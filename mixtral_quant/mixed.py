"""MoE-aware mixed precision: a width per expert linear under a byte budget.

Each expert linear ``n`` has a few candidate widths ``b``, each with the bytes it stores at that width
(codes, scales, zeros, group indices: what its tensors hold on disk) and a cost,

    cost(n, b) = share(e) * ||X_n (W_n - Q_b(W_n))^T||^2 / ||X_n W_n^T||^2,

its relative output error on the calibration tokens the router sends its expert ``e`` (the same figure
``calibration.json`` reports per linear), times the share of the router's top-k slots that expert gets.
A rarely used expert's error counts for little, a busy one's for much. The allocation picks one width
per linear minimising the summed cost with the stored bytes at most the budget: a multiple-choice
knapsack, solved by dynamic programming over the bytes in units of their greatest common divisor, so it
is exact (tested against brute force). When that table would be too large (Mixtral-8x7B's 768 expert
linears) the unit grows, each size rounded up to whole units: the result still fits the budget and is
optimal for the rounded sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

MAX_CELLS = 1 << 26  # items x budget units held by the table (int8 choices: 64 MiB)


@dataclass(frozen=True)
class Choice:
    """One width of one linear: what it stores and what it costs."""

    bits: int
    nbytes: int
    cost: float


def allocate(items: Mapping[str, Sequence[Choice]], budget: int) -> dict[str, Choice]:
    """The choice per item minimising the summed cost with the summed bytes at most ``budget``.

    ConfigError when even the smallest choice of every item does not fit. Ties go to the fewer bytes,
    then to the item's earlier choice."""
    names = sorted(items)
    if not names:
        return {}
    options = [sorted(items[n], key=lambda c: (c.nbytes, c.bits)) for n in names]
    least = sum(o[0].nbytes for o in options)
    if least > budget:
        raise ConfigError(f"the byte budget {budget:,} is below the smallest width of every linear ({least:,} bytes)")
    spare = budget - least
    extra = [[c.nbytes - o[0].nbytes for c in o] for o in options]
    nonzero = [e for row in extra for e in row if e]
    unit = math.gcd(*nonzero) if nonzero else 1
    unit = max(unit, math.ceil((spare + 1) * len(names) / MAX_CELLS))
    size = spare // unit + 1
    best = np.zeros(size)  # best[c]: least cost of the items so far within c units of spare bytes
    picks = np.zeros((len(names), size), dtype=np.int8)
    for i, row in enumerate(options):
        new = np.full(size, np.inf)
        for j, choice in enumerate(row):
            need = math.ceil(extra[i][j] / unit)
            if need >= size:
                continue
            cand = np.full(size, np.inf)
            cand[need:] = best[: size - need] + choice.cost
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    c = size - 1
    chosen: dict[str, Choice] = {}
    for i in range(len(names) - 1, -1, -1):
        j = int(picks[i, c])
        chosen[names[i]] = options[i][j]
        c -= math.ceil(extra[i][j] / unit)
    return dict(sorted(chosen.items()))


def cost_of(choices: Mapping[str, Choice]) -> float:
    return sum(c.cost for c in choices.values())


def bytes_of(choices: Mapping[str, Choice]) -> int:
    return sum(c.nbytes for c in choices.values())
