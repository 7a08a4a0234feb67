"""The budget solver against brute force, on small random instances."""

import itertools
import random

from memfit.plan.menu import Option, Unit
from memfit.plan.solve import smallest, solve


def _instance(rng, n_units=4, n_opts=4, blocks=2):
    units = []
    for k in range(n_units):
        sizes = sorted(rng.sample(range(10, 200), n_opts), reverse=True)
        dmg = sorted(rng.uniform(0, 1) for _ in range(n_opts))
        dmg[0] = 0.0  # the largest option is lossless, like 16-bit
        opts = [Option(f"o{j}", "f", stored=s, resident=s, damage=d)
                for j, (s, d) in enumerate(zip(sizes, dmg))]
        units.append(Unit(f"u{k}", k % blocks if blocks else None, opts))
    return units


def _brute(units, budget, drop_damage, max_drop):
    best = None
    blocks = sorted({u.block for u in units if u.block is not None})
    for dropped in itertools.chain.from_iterable(
            itertools.combinations(blocks, r) for r in range(max_drop + 1)):
        live = [u for u in units if u.block not in dropped]
        for pick in itertools.product(*[range(len(u.options)) for u in live]):
            size = sum(u.options[j].resident for u, j in zip(live, pick))
            if size > budget:
                continue
            dmg = sum(u.options[j].damage for u, j in zip(live, pick)) \
                + sum(drop_damage[b] for b in dropped)
            if best is None or dmg < best:
                best = dmg
    return best


def test_solver_is_feasible_and_near_optimal():
    rng = random.Random(0)
    gaps = []
    for _ in range(150):
        units = _instance(rng)
        drop = [rng.uniform(0.5, 3) for _ in range(2)]
        lo = smallest(units, max_drop=1, blocks=2, size=lambda o: o.resident)
        hi = sum(u.options[0].resident for u in units)
        budget = rng.randint(lo, hi)
        sol = solve(units, budget, alpha={"f": 1.0, "drop": 1.0}, drop_damage=drop, max_drop=1)
        opt = _brute(units, budget, drop, 1)
        assert sol is not None and opt is not None
        assert sol.bytes <= budget
        live = [u for u in units if u.block not in sol.dropped]
        assert sol.bytes == sum(u.options[sol.choice[u.key]].resident for u in live)
        assert sol.damage >= opt - 1e-12  # brute force is the optimum
        gaps.append(sol.damage - opt)
    exact = sum(g < 1e-9 for g in gaps) / len(gaps)
    print(f"optimal in {exact:.0%} of instances, worst gap {max(gaps):.3f}")
    assert exact >= 0.95  # the DP is exact up to the byte rounding
    assert max(gaps) < 0.05


def test_solver_refuses_what_cannot_fit_and_keeps_everything_when_it_can():
    units = _instance(random.Random(1), blocks=0)
    least = smallest(units)
    assert solve(units, least - 1, alpha={}) is None
    full = sum(u.options[0].resident for u in units)
    sol = solve(units, full, alpha={})
    assert sol.damage == 0.0 and sol.bytes == full


def test_family_factor_changes_the_choice():
    # two units with equal raw damage: the family with the larger factor keeps more bytes
    a = Unit("a", None, [Option("fp16", "keep", 100, 100), Option("q", "x", 50, 50, damage=1.0)])
    b = Unit("b", None, [Option("fp16", "keep", 100, 100), Option("q", "y", 50, 50, damage=1.0)])
    sol = solve([a, b], 150, alpha={"x": 1.0, "y": 3.0})
    assert sol.choice == {"a": 1, "b": 0}
    sol = solve([a, b], 150, alpha={"x": 3.0, "y": 1.0})
    assert sol.choice == {"a": 0, "b": 1}
