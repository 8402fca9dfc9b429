"""Every MILP back end against brute force, on infeasible models, with hints, and under a time limit."""

from __future__ import annotations

import itertools
import signal
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog

from prism_plan.solvers.backends import BACKENDS, MilpModel
from prism_plan.solvers.backends import cbc

TOL = 1e-6
SEEDS = range(4)


def planted(a: np.ndarray, x0: np.ndarray, rng: np.random.Generator):
    """(row_lb, row_ub), each [rows], that the point x0 satisfies: cycling through equality, <=, >=,
    two-sided and free rows."""
    r = a @ x0
    slack = rng.uniform(0, 3, size=(2, len(r)))
    kind = np.arange(len(r)) % 5
    lb = np.where(np.isin(kind, [0, 2, 3]), r - slack[0] * (kind != 0), -np.inf)
    ub = np.where(np.isin(kind, [0, 1, 3]), r + slack[1] * (kind != 0), np.inf)
    return lb, ub


def binary_model(seed: int) -> tuple[MilpModel, np.ndarray]:
    """(model, x0): 16 binaries and 7 rows with integer coefficients; x0 [16] is a feasible point."""
    rng = np.random.default_rng(seed)
    n = 16
    a = rng.integers(-5, 6, size=(7, n)) * (rng.random((7, n)) < 0.6)
    x0 = rng.integers(0, 2, n).astype(float)
    row_lb, row_ub = planted(a, x0, rng)
    model = MilpModel(c=rng.normal(size=n), A=sp.csr_matrix(a.astype(float)), row_lb=row_lb, row_ub=row_ub,
                      lb=np.zeros(n), ub=np.ones(n), integer=np.ones(n, bool), maximize=bool(seed % 2))
    return model, x0


def mixed_model(seed: int) -> tuple[MilpModel, np.ndarray]:
    """(model, x0) over 19 variables in random order, x0 feasible: 5 binaries, an integer in [-1, 2], 8
    continuous ones in random boxes, one in [-3, -1], one fixed, one in no row and without cost, and two
    whose costs push them down: a free one that the last but one (equality) row ties to the others, and one
    in (-inf, 5] held at -2.5 by the last row."""
    rng = np.random.default_rng(100 + seed)
    maximize = bool(seed % 2)
    lb = np.concatenate([np.zeros(5), [-1], rng.uniform(-3, 0, 8), [-3, 0.7, 0, -np.inf, -np.inf]])
    ub = np.concatenate([np.ones(5), [2], lb[6:14] + rng.uniform(0.5, 3, 8), [-1, 0.7, 2, np.inf, 5]])
    integer = np.arange(len(lb)) < 6
    x0 = np.concatenate([rng.integers(0, 2, 5), [rng.integers(-1, 3)], rng.uniform(lb[6:15], ub[6:15]),
                         [0.7, 1.0, 0.0, 0.0]])
    a = rng.integers(-5, 6, size=(8, len(lb))) * (rng.random((8, len(lb))) < 0.5)
    a[:, 16:] = 0
    row_lb, row_ub = planted(a.astype(float), x0, rng)
    tie, floor = np.zeros(len(lb)), np.zeros(len(lb))
    tie[:16], tie[17], floor[18] = rng.integers(-2, 3, 16), -1.0, 1.0
    x0[17] = tie[:16] @ x0[:16]
    c = rng.normal(size=len(lb))
    c[16], c[17:] = 0.0, -1.0 if maximize else 1.0
    order = rng.permutation(len(lb))  # integer variables among the continuous ones
    model = MilpModel(c=c[order], A=sp.csr_matrix(np.vstack([a, tie, floor])[:, order]),
                      row_lb=np.append(row_lb, [0.0, -2.5]), row_ub=np.append(row_ub, [0.0, np.inf]),
                      lb=lb[order], ub=ub[order], integer=integer[order], maximize=maximize)
    return model, x0[order]


def brute_force(model: MilpModel) -> float:
    """The optimum of `model` by enumerating its integer variables, the continuous ones solved by linprog."""
    ints = np.flatnonzero(model.integer)
    cont = np.flatnonzero(~model.integer)
    a = model.A.toarray()
    sign = -1.0 if model.maximize else 1.0
    equal = model.row_lb == model.row_ub
    upper, lower = ~equal & np.isfinite(model.row_ub), ~equal & np.isfinite(model.row_lb)
    best = np.inf
    for z in itertools.product(*(range(int(model.lb[j]), int(model.ub[j]) + 1) for j in ints)):
        fixed = a[:, ints] @ np.array(z, float)
        ac = a[:, cont]
        lp = linprog(sign * model.c[cont],
                     A_ub=np.vstack([ac[upper], -ac[lower]]),
                     b_ub=np.concatenate([(model.row_ub - fixed)[upper], (fixed - model.row_lb)[lower]]),
                     A_eq=ac[equal], b_eq=(model.row_lb - fixed)[equal],
                     bounds=list(zip(model.lb[cont], model.ub[cont])), method="highs")
        if lp.status == 0:
            best = min(best, sign * model.c[ints] @ np.array(z, float) + lp.fun)
    assert np.isfinite(best), "the planted point makes every model feasible"
    return sign * best


def brute_force_binary(model: MilpModel) -> float:
    """The optimum of an all-binary `model`, every 0-1 vector checked at once."""
    n = len(model.c)
    x = (np.arange(2 ** n)[:, None] >> np.arange(n) & 1).astype(float)
    rows = x @ model.A.toarray().T
    ok = np.all((rows >= model.row_lb - TOL) & (rows <= model.row_ub + TOL), axis=1)
    values = x[ok] @ model.c
    return values.max() if model.maximize else values.min()


MODELS = [("binary", seed) for seed in SEEDS] + [("mixed", seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def optima() -> dict:
    """(kind, seed) -> (model, x0, brute-force optimum), shared by every back end."""
    out = {}
    for kind, seed in MODELS:
        model, x0 = binary_model(seed) if kind == "binary" else mixed_model(seed)
        out[kind, seed] = model, x0, brute_force_binary(model) if kind == "binary" else brute_force(model)
    return out


def assert_feasible(model: MilpModel, x: np.ndarray) -> None:
    rows = model.A @ x
    assert np.all(rows >= model.row_lb - TOL) and np.all(rows <= model.row_ub + TOL)
    assert np.all(x >= model.lb - TOL) and np.all(x <= model.ub + TOL)
    assert np.array_equal(x[model.integer], np.round(x[model.integer]))


def test_planted_points_are_feasible(optima):
    for model, x0, _ in optima.values():
        assert_feasible(model, x0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("kind, seed", MODELS)
def test_optimum_matches_brute_force(backend, kind, seed, optima):
    model, _, best = optima[kind, seed]
    sol = BACKENDS[backend]().solve(model, 30.0)
    assert sol.status == "optimal"
    assert_feasible(model, sol.x)
    assert model.c @ sol.x == pytest.approx(best, rel=TOL, abs=TOL)
    assert sol.bound == pytest.approx(best, rel=TOL, abs=TOL)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("kind, seed", [("binary", 1), ("mixed", 2)])
def test_hint_keeps_the_optimum(backend, kind, seed, optima):
    model, x0, best = optima[kind, seed]
    sol = BACKENDS[backend]().solve(replace(model, hint=x0), 30.0)
    assert sol.status == "optimal"
    assert model.c @ sol.x == pytest.approx(best, rel=TOL, abs=TOL)


def infeasible_models() -> list[MilpModel]:
    """Three binaries that cannot sum to 4 (the LP says so), that cannot sum to 1.5 (only integrality says
    so); a variable with lb > ub, a row with row_lb > row_ub."""
    one = dict(A=sp.csr_matrix(np.ones((1, 3))), c=np.ones(3), lb=np.zeros(3), ub=np.ones(3),
               integer=np.ones(3, bool))
    return [MilpModel(row_lb=np.array([4.0]), row_ub=np.array([np.inf]), **one),
            MilpModel(row_lb=np.array([1.5]), row_ub=np.array([1.5]), **one),
            MilpModel(**{**one, "lb": np.array([0.0, 0.0, 1.0]), "ub": np.array([1.0, 1.0, 0.0])},
                      row_lb=np.array([-np.inf]), row_ub=np.array([np.inf])),
            MilpModel(row_lb=np.array([2.0]), row_ub=np.array([1.0]), **one)]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("which", range(4))
def test_infeasible(backend, which):
    sol = BACKENDS[backend]().solve(infeasible_models()[which], 30.0)
    assert sol.status == "infeasible" and sol.x is None


def multi_knapsack(n: int = 300, m: int = 5, seed: int = 0) -> MilpModel:
    """A 0-1 multi-knapsack (n items, m weight rows, capacity half the total): CBC, HiGHS and SCIP each
    need well over 20 s to prove it."""
    rng = np.random.default_rng(seed)
    w = rng.integers(10, 100, size=(m, n)).astype(float)
    return MilpModel(c=w.mean(0) + rng.integers(-5, 6, size=n), A=sp.csr_matrix(w),
                     row_lb=np.full(m, -np.inf), row_ub=w.sum(1) / 2, lb=np.zeros(n), ub=np.ones(n),
                     integer=np.ones(n, bool))


def market_split(m: int = 6, seed: int = 0, plant: bool = False) -> MilpModel:
    """Cornuejols-Dawande market split: m equality rows over 10 (m - 1) binaries with coefficients in
    [0, 99], right-hand sides half the row sums, or those of a random point with `plant` (then the point is
    the hint). Solvers find no solution in seconds."""
    n = 10 * (m - 1)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 100, size=(m, n)).astype(float)
    point = rng.integers(0, 2, n).astype(float)
    rhs = a @ point if plant else np.floor(a.sum(1) / 2)
    return MilpModel(c=rng.integers(1, 10, n).astype(float), A=sp.csr_matrix(a), row_lb=rhs, row_ub=rhs,
                     lb=np.zeros(n), ub=np.ones(n), integer=np.ones(n, bool), maximize=False,
                     hint=point if plant else None)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("model, statuses", [(multi_knapsack(), {"feasible"}),
                                             (market_split(), {"timeout"})], ids=["knapsack", "market-split"])
def test_time_limit_is_kept(backend, model, statuses):
    began = time.perf_counter()
    sol = BACKENDS[backend]().solve(model, 0.5)
    wall = time.perf_counter() - began
    assert wall <= 0.5 + 2.0
    assert sol.status in statuses and (sol.x is None) == (sol.status == "timeout")
    if sol.x is not None:
        assert_feasible(model, sol.x)
        assert sol.bound is None or sol.bound >= model.c @ sol.x - TOL


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_hint_is_used(backend):
    """With 0.5 s a planted market split is found only through its hint."""
    model = market_split(plant=True)
    sol = BACKENDS[backend]().solve(model, 0.5)
    assert sol.status in ("feasible", "optimal")
    assert_feasible(model, sol.x)
    assert model.c @ sol.x <= model.c @ model.hint + TOL


def test_cbc_bound_of_a_stopped_search_is_a_bound():
    model = multi_knapsack()
    sol = BACKENDS["cbc"]().solve(model, 0.5)
    longer = BACKENDS["highs"]().solve(model, 1.0)
    assert sol.bound is not None and longer.x is not None
    assert sol.bound >= model.c @ longer.x


def test_cbc_files_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(cbc.tempfile, "tempdir", str(tmp_path))
    BACKENDS["cbc"]().solve(multi_knapsack(), 0.2)
    assert list(tmp_path.iterdir()) == []


def test_cbc_is_killed_and_files_removed_on_keyboard_interrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(cbc.tempfile, "tempdir", str(tmp_path))
    running = []

    def interrupted(proc, seconds):
        running.append(proc)
        raise KeyboardInterrupt

    monkeypatch.setattr(cbc, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        BACKENDS["cbc"]().solve(multi_knapsack(), 30.0)
    assert running[0].poll() is not None
    assert list(tmp_path.iterdir()) == []


def test_a_process_that_ignores_sigint_is_killed(tmp_path):
    """The promise holds even when CBC does not answer SIGINT: it is killed _SIGINT_GRACE later."""
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(30)"
    began = time.perf_counter()
    with cbc._running([sys.executable, "-c", stubborn], tmp_path) as proc:
        cbc._wait(proc, 0.2)
    assert proc.returncode == -signal.SIGKILL
    assert time.perf_counter() - began <= 0.2 + 1.5


def test_highspy_stays_out():
    """OR-Tools and highspy bundle clashing HiGHS builds; no back end (PuLP included) may import highspy."""
    assert "highspy" not in sys.modules
