"""Choose one option per unit (and which blocks to drop) to minimise predicted damage under a
byte budget: a multiple-choice knapsack with an optional per-block "drop" that removes all of a
block's units at once.

It is solved exactly by dynamic programming over bytes: the budget is cut into `RESOLUTION`
steps, every option's size is rounded UP to whole steps (so the result always fits), and the
table "least damage within b steps, with k blocks dropped" is updated unit by unit, vectorised
over b and k; a block's drop branches off the table as it was before the block's units. The
rounding can cost at most one step per unit of the budget (0.5% for 200 units at 40000 steps);
the bytes it leaves unused are then spent greedily on the upgrades saving the most damage per
byte. A Lagrangian relaxation (price per byte, per-unit choices) was the first version: on 4-unit
test instances it was optimal only 63% of the time; the DP is optimal up to the rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memfit.plan.menu import Option, Unit


@dataclass
class Solution:
    choice: dict[str, int]      # unit key -> option index
    dropped: list[int]          # block indices
    bytes: int                  # the units' bytes (dropped blocks' units count 0)
    damage: float               # predicted, with the family factors

    def option(self, units: list[Unit], key: str) -> Option:
        return next(u for u in units if u.key == key).options[self.choice[key]]


def _cost(opt: Option, alpha: dict[str, float]) -> float:
    return alpha.get(opt.family, 1.0) * opt.damage


def _evaluate(units, choice, dropped, alpha, size) -> tuple[int, float]:
    gone = set(dropped)
    total, dmg = 0, 0.0
    for u in units:
        if u.block is not None and u.block in gone:
            continue
        o = u.options[choice[u.key]]
        total += size(o)
        dmg += _cost(o, alpha)
    return total, dmg


RESOLUTION = 40000


def solve(units: list[Unit], budget: int, *, alpha: dict[str, float],
          drop_damage: list[float] | None = None, max_drop: int = 0,
          size=lambda o: o.resident) -> Solution | None:
    """The plan minimising predicted damage with Σ size(option) <= budget; None if even the
    smallest plan does not fit."""
    drop_damage = drop_damage or []
    max_drop = min(max_drop, len(drop_damage))
    if budget < 0 or smallest(units, max_drop=max_drop, size=size) > budget:
        return None
    step = max(budget / RESOLUTION, 1.0)
    nb = int(budget // step) + 1
    order = sorted(units, key=lambda u: (u.block is not None, u.block if u.block is not None else 0))
    table = np.full((max_drop + 1, nb), np.inf)
    table[0, :] = 0.0  # least damage within b steps with k blocks dropped
    args, drops, snap, current = [], {}, None, object()
    for idx, u in enumerate(order):
        if u.block != current:
            if u.block is not None:
                snap = table.copy()
            current = u.block
        new = np.full_like(table, np.inf)
        arg = np.zeros(table.shape, dtype=np.int16)
        for j, o in enumerate(u.options):
            s = int(np.ceil(size(o) / step - 1e-9))
            if s >= nb:
                continue
            cand = np.full_like(table, np.inf)
            cand[:, s:] = table[:, :nb - s] + _cost(o, alpha)
            better = cand < new
            new[better], arg[better] = cand[better], j
        table = new
        args.append(arg)
        last = idx + 1 == len(order) or order[idx + 1].block != u.block
        if u.block is not None and last and max_drop and u.block < len(drop_damage):
            dropped = np.full_like(table, np.inf)
            dropped[1:] = snap[:-1] + alpha.get("drop", 1.0) * drop_damage[u.block]
            take = dropped < table
            table = np.where(take, dropped, table)
            drops[u.block] = take
    k, b = np.unravel_index(np.argmin(table), table.shape)
    if not np.isfinite(table[k, b]):
        return None
    choice, dropped_blocks = _trace(order, args, drops, int(k), int(b), size, step)
    choice = _fill(units, choice, dropped_blocks, budget, alpha, size)
    used, dmg = _evaluate(units, choice, dropped_blocks, alpha, size)
    dmg += sum(alpha.get("drop", 1.0) * drop_damage[i] for i in dropped_blocks)
    return Solution(choice=choice, dropped=sorted(dropped_blocks), bytes=used, damage=dmg)


def _trace(order, args, drops, k, b, size, step):
    """Walk the DP back from (k, b): each unit's option, and the dropped blocks."""
    choice, dropped = {}, []
    idx = len(order) - 1
    while idx >= 0:
        u = order[idx]
        if u.block is not None and u.block in drops and drops[u.block][k, b] \
                and (idx + 1 == len(order) or order[idx + 1].block != u.block):
            dropped.append(u.block)
            first = idx
            while first > 0 and order[first - 1].block == u.block:
                first -= 1
            for v in order[first:idx + 1]:
                choice[v.key] = min(range(len(v.options)), key=lambda j: size(v.options[j]))
            k -= 1
            idx = first - 1
            continue
        j = int(args[idx][k, b])
        choice[u.key] = j
        b -= int(np.ceil(size(u.options[j]) / step - 1e-9))
        idx -= 1
    return choice, dropped


def _fill(units, choice, dropped, budget, alpha, size) -> dict[str, int]:
    """Spend the bytes left over: repeatedly take the upgrade saving the most damage per byte."""
    choice = dict(choice)
    gone = set(dropped)
    live = [u for u in units if u.block is None or u.block not in gone]
    left = budget - sum(size(u.options[choice[u.key]]) for u in live)
    while True:
        best = None
        for u in live:
            cur = u.options[choice[u.key]]
            for j, o in enumerate(u.options):
                extra = size(o) - size(cur)
                saved = _cost(cur, alpha) - _cost(o, alpha)
                if saved <= 0 or extra > left:
                    continue
                rate = saved / max(extra, 1)
                if best is None or rate > best[0]:
                    best = (rate, u.key, j, extra)
        if best is None:
            return choice
        _, key, j, extra = best
        choice[key] = j
        left -= extra


def smallest(units: list[Unit], *, max_drop: int = 0, blocks: int = 0,
             size=lambda o: o.resident) -> int:
    """Bytes of the smallest plan: every unit at its smallest option, `max_drop` blocks gone."""
    per_block: dict[int, int] = {}
    total = 0
    for u in units:
        m = min(size(o) for o in u.options)
        if u.block is None:
            total += m
        else:
            per_block[u.block] = per_block.get(u.block, 0) + m
    kept = sorted(per_block.values())[:max(len(per_block) - max_drop, 0)]
    return total + sum(kept)
