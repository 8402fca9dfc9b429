"""`balance`: a serving layout that minimises every MoE layer's busiest-GPU time, with proven bounds.

The model, per layer (layers are independent): every GPU g holds exactly S = slots_per_layer distinct experts
(x[g, e] in {0, 1}, sum_e x[g, e] = S), every expert has c_e = sum_g x[g, e] copies, min_replicas <= c_e <= gpus,
an expert's demand is split evenly over its copies, and a layer's time is max_g (sum_e demand[e] x[g, e] / c_e) /
speed[g]. The objective is the sum of the layers' times, plus in a re-plan the cost of every copy made anew.

The layout starts as DeepSeek EPLB does (copy counts that minimise the largest piece, then the heaviest piece
first onto the GPU it leaves least busy, here with the distinct-experts rule and GPU speeds) and improves by
local moves on the busiest GPU of each layer, all layers at once: swap one of its copies with a lighter one on
another GPU, or change copy counts (a copy of a cold expert with a spare copy gives its slot to another copy of
a hot one). Each layer's time is compared with a proven lower bound (`layer_bounds`); a layer that reaches it
stops early. A layer small enough for its exact MILP (`layer_model`, MILP_VARS) is then solved by it, started
from the search's layout, which proves it optimal or raises its bound.

Pure arrays: demand [layers, experts], speed [gpus], layouts [gpus, layers, experts] bool;
`solve_layout_balance` applies it to a PlacementProblem with a slot layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from prism_plan.errors import PrismError
from prism_plan.placement.checks import finite_array, integer
from prism_plan.solvers.backends import BACKENDS, MilpModel
from prism_plan.solvers.deadline import UNLIMITED, Deadline
from prism_plan.solvers.objectives import OPTIMALITY_TOLERANCE, MoveTerms, even_dispatch, relative_gap
from prism_plan.solvers.problem import PlacementProblem, Solution

# A move must improve by this share of the busiest GPU's time: it keeps float noise from counting as progress.
IMPROVEMENT = 1e-9
# Bisection steps of the piece-count bound: 2^-60 of the bracket, far below OPTIMALITY_TOLERANCE.
BISECTION_STEPS = 60
# Thresholds at most this many distinct GPU speeds each; a subset of the valid conditions is still valid.
BOUND_SPEEDS = 6
# The piece-count bound is shrunk by this share so that float rounding in its comparisons cannot overstate it.
BOUND_SLACK = 1e-9
# Level moves that copy something, per GPU, that a re-plan's layer may make in a row without improving.
LEVEL_STREAK = 1
# Layers whose exact MILP has at most this many variables are solved by it, each given at most MILP_SECONDS
# (measured, HiGHS on 1 core: 4 GPUs x 6 experts, 91-121 variables, 0.2-1.8 s to proof; 4 x 10, 201, 0.8-1.5 s;
# 5 x 8, 241, no proof in 5 s: GPUs of equal speed make the model symmetric).
MILP_VARS = 200
MILP_SECONDS = 2.0
# Count-change candidates are scored [candidates, gpus] at a time, per layer; this caps that array's size.
CHUNK = 1 << 20


@dataclass
class BalanceResult:
    """A layout and its evidence.

    hosted: [gpus, layers, experts] bool, exactly slots_per_layer distinct experts per GPU per layer;
    layer_time: [layers] max over GPUs of load / speed (load: demand units, an expert's split evenly over its
    copies); layer_bound: [layers] a proven lower bound on each layer's optimal time; status: "optimal" when
    every layer's time (plus, in a re-plan, its copy cost) is within OPTIMALITY_TOLERANCE of its bound, else
    "feasible"; added: cells hosted that `current` lacks (0 without current); extra: evidence (which bound was
    tight per layer, the moves made, why the search stopped, copy cost and bytes of a re-plan)."""

    hosted: np.ndarray
    layer_time: np.ndarray
    layer_bound: np.ndarray
    status: str
    added: int
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- inputs


def _check_demand(demand) -> np.ndarray:
    return finite_array(demand, "demand", ndim=2, shape="a [layers, experts] array of activations",
                        holds="finite activation counts >= 0; drop NaNs and negative values")


def _check_speed(speed) -> np.ndarray:
    return finite_array(speed, "speed", ndim=1, shape="a [gpus] array of relative throughputs",
                        holds="finite throughputs > 0 (1.0 for a reference GPU)", positive=True)


def _check_slots(slots_per_layer, min_replicas, gpus: int, experts: int) -> tuple[int, int]:
    slots = integer(slots_per_layer, "`slots_per_layer`", low=1, high=experts,
                    fix="a GPU holds distinct experts, so at most one slot per expert", parameters=("slots_per_layer",))
    m = integer(min_replicas, "`min_replicas`", low=1, high=gpus,
                fix="an expert has at most one copy per GPU", parameters=("min_replicas",))
    if gpus * slots < m * experts:
        raise PrismError(f"{gpus} GPUs x `slots_per_layer` {slots} = {gpus * slots} slots cannot hold "
                         f"`min_replicas` {m} copies of {experts} experts; raise slots_per_layer to at least "
                         f"{-(-m * experts // gpus)}", parameters=("slots_per_layer", "min_replicas"))
    return slots, m


def _check_current(current, shape: tuple[int, int, int], slots: int, m: int) -> np.ndarray:
    c = np.asarray(current)
    if c.shape != shape or c.dtype.kind not in "bui":
        raise PrismError(f"`current` must be a [gpus, layers, experts] = {list(shape)} bool layout, got shape "
                         f"{list(c.shape)} of {c.dtype}", parameters=("current",))
    if not np.isin(c, (0, 1)).all():
        raise PrismError("`current` must hold 0/1 (bool) cells", parameters=("current",))
    c = c.astype(bool)
    per_gpu = c.sum(axis=2)
    if (per_gpu != slots).any():
        g, l = np.argwhere(per_gpu != slots)[0]
        raise PrismError(f"`current` holds {per_gpu[g, l]} experts on GPU {g} in layer {l}, not "
                         f"`slots_per_layer` {slots}; pass a layout with the same slots", parameters=("current",))
    copies = c.sum(axis=0)
    if (copies < m).any():
        l, e = np.argwhere(copies < m)[0]
        raise PrismError(f"`current` has {copies[l, e]} copies of expert {e} in layer {l}, under `min_replicas` "
                         f"{m}", parameters=("current", "min_replicas"))
    return c


def _check_move_terms(current, add_cost, add_bytes, budget_bytes, shape):
    """(add_cost [gpus, layers, experts] float, add_bytes [layers] int64, budget or None), checked."""
    named = [n for n, v in (("add_cost", add_cost), ("add_bytes", add_bytes), ("budget_bytes", budget_bytes))
             if v is not None]
    if current is None and named:
        raise PrismError(f"`{named[0]}` prices copies made anew: pass the `current` layout too",
                         parameters=(named[0], "current"))
    cost = np.zeros(shape) if add_cost is None else np.asarray(add_cost, dtype=float)
    if cost.shape != shape or not np.isfinite(cost).all() or (cost < 0).any():
        raise PrismError(f"`add_cost` must be a [gpus, layers, experts] = {list(shape)} array of finite costs >= 0",
                         parameters=("add_cost",))
    if budget_bytes is not None and add_bytes is None:
        raise PrismError("`budget_bytes` limits the bytes copied: pass `add_bytes`, the bytes of one copy per layer",
                         parameters=("budget_bytes", "add_bytes"))
    size = np.zeros(shape[1], np.int64) if add_bytes is None else np.asarray(add_bytes)
    if size.shape != (shape[1],) or size.dtype.kind not in "iu" or (size < 0).any():
        raise PrismError(f"`add_bytes` must be a [layers] = [{shape[1]}] array of whole bytes >= 0",
                         parameters=("add_bytes",))
    budget = None if budget_bytes is None else integer(budget_bytes, "`budget_bytes`", low=0,
                                                       parameters=("budget_bytes",))
    return cost, size.astype(np.int64), budget


# ---------------------------------------------------------------------------------------------------- bounds


def fewest_largest_pieces(demand: np.ndarray, gpus: int, slots: int, min_replicas: int) -> np.ndarray:
    """[layers, experts] int64 copy counts that minimise the largest piece demand / count: min_replicas each,
    then one at a time to the expert with the largest piece that has fewer than `gpus` copies, until every one
    of gpus x slots slots is used. Greedy is optimal for this min-max (as in EPLB's `replicate_experts`, plus the
    cap). demand: [layers, experts]."""
    layers, experts = demand.shape
    count = np.full((layers, experts), min_replicas, np.int64)
    piece = demand / min_replicas
    r = np.arange(layers)
    for _ in range(gpus * slots - min_replicas * experts):  # sequential in the copies, all layers at once
        hot = np.argmax(np.where(count < gpus, piece, -np.inf), axis=1)
        count[r, hot] += 1
        piece[r, hot] = demand[r, hot] / count[r, hot]
    return count


def _fewest_big_pieces(demand: np.ndarray, above: np.ndarray, gpus: int, spare: int, min_replicas: int):
    """[..., layers]: at most how few pieces larger than `above` ([..., layers]) any copy counts give. An expert
    whose min_replicas pieces exceed the threshold either keeps those pieces or takes enough extra copies to
    bring them under it (at most gpus); all such experts save the same min_replicas pieces, so the cheapest in
    extra copies go first within the `spare` slots (a knapsack of equal values, solved by greedy). Using at most
    (not exactly) the spare slots relaxes the problem, so the count never overstates the truth."""
    a = above[..., None]
    big = demand / min_replicas > a
    need = np.ceil(demand / np.where(a > 0, a, np.inf))
    extra = np.where(big & (need <= gpus), need - min_replicas, np.inf)
    fixed = (np.cumsum(np.sort(extra, axis=-1), axis=-1) <= spare).sum(axis=-1)
    return min_replicas * (big.sum(axis=-1) - fixed)


def piece_count_bound(demand: np.ndarray, speed: np.ndarray, slots: int, min_replicas: int,
                      high: np.ndarray) -> np.ndarray:
    """[layers]: a lower bound on each layer's optimal time, from counting pieces above thresholds.

    If a layout has time t, GPU g carries load <= t speed[g], so it holds at most min(slots, ceil(t speed[g] /
    a) - 1) pieces larger than a (j such pieces weigh more than j a). Taking a = t speed_u / k for some GPU
    speed speed_u and k = 1..slots, the room for big pieces, sum_g min(slots, ceil(k speed[g] / speed_u) - 1),
    does not depend on t; the fewest big pieces any copy counts give (`_fewest_big_pieces`) falls as t grows.
    So a t where they do not fit is below the optimum, and bisection finds the largest such t. k = 1 with the
    fastest speed is the classic bound: the largest achievable piece over the fastest GPU. `high`: [layers]
    a time that is achievable (a layout's), the bisection's upper end."""
    layers, experts = demand.shape
    gpus = len(speed)
    spare = gpus * slots - min_replicas * experts
    ratios = np.unique(speed)[::-1][:BOUND_SPEEDS]
    k = np.arange(1, slots + 1)
    unit = (ratios[:, None] / k[None, :]).ravel()  # a = t * unit
    # j pieces above t * unit weigh more than j t unit, so GPU g fits j < speed[g] / unit of them
    room = np.minimum(slots, np.ceil(speed[None, :] / unit[:, None]) - 1).sum(axis=1)  # [conditions]
    low = np.zeros(layers)
    high = np.asarray(high, float).copy()
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (low + high)
        big = _fewest_big_pieces(demand[None], mid[None, :] * unit[:, None], gpus, spare, min_replicas)
        infeasible = (big > room[:, None]).any(axis=0)
        low = np.where(infeasible, mid, low)
        high = np.where(infeasible, high, mid)
    return low * (1 - BOUND_SLACK)


def layer_bounds(demand: np.ndarray, speed: np.ndarray, slots: int, min_replicas: int,
                 high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([layers] lower bounds on each layer's optimal time, [layers] names of the tight one).

    fluid: all of a layer's demand spread over the GPUs in proportion to their speed, total / sum(speed); the
    busiest GPU's time is at least the average. pieces: `piece_count_bound`. cardinality: in any layout the
    largest piece is at least the smallest achievable largest piece (`fewest_largest_pieces`), and its GPU holds
    slots - 1 copies of other, distinct experts, each at least that expert's demand over `gpus` copies, so at
    least the slots - 1 smallest such values; the GPU's time is that sum over the fastest speed or more.
    high: [layers] achievable times."""
    gpus = len(speed)
    fluid = demand.sum(axis=1) / speed.sum()
    largest = (demand / fewest_largest_pieces(demand, gpus, slots, min_replicas)).max(axis=1)
    rest = np.sort(demand / gpus, axis=1)[:, :slots - 1].sum(axis=1)
    cardinality = (largest + rest) / speed.max() * (1 - BOUND_SLACK)
    pieces = piece_count_bound(demand, speed, slots, min_replicas, np.maximum(high, fluid))
    bounds = np.stack([fluid, cardinality, pieces])
    names = np.array(["fluid", "cardinality", "pieces"])
    return bounds.max(axis=0), names[bounds.argmax(axis=0)]


# ---------------------------------------------------------------------------------------------------- layout


@dataclass
class _State:
    """A layout under search, layer-major: slot [layers, gpus, slots] the expert in each slot, host [layers,
    gpus, experts] bool, count [layers, experts] copies, load [layers, gpus] demand carried; charge [layers,
    gpus, experts] cost of hosting each cell (0 where `current` has it, None without move terms) and size its
    bytes; budget_left: bytes that may still be copied (None: no limit)."""

    demand: np.ndarray
    speed: np.ndarray
    min_replicas: int
    slot: np.ndarray
    host: np.ndarray
    count: np.ndarray
    load: np.ndarray
    charge: np.ndarray | None = None
    size: np.ndarray | None = None
    budget_left: float = np.inf
    moves: dict = field(default_factory=lambda: {"rounds": 0, "swaps": 0, "count_changes": 0})

    def piece(self, li: np.ndarray) -> np.ndarray:
        """[len(li), gpus, slots]: the demand each slot's copy carries in layers `li`."""
        d = np.take_along_axis(self.demand[li], self.slot[li].reshape(len(li), -1), axis=1)
        c = np.take_along_axis(self.count[li], self.slot[li].reshape(len(li), -1), axis=1)
        return (d / c).reshape(self.slot[li].shape)

    def time(self) -> np.ndarray:
        """[layers]: the busiest GPU's time per layer."""
        return (self.load / self.speed).max(axis=1)

    def layer_cost(self) -> np.ndarray:
        """[layers]: the cost of the copies made anew, per layer (0 without move terms)."""
        return np.zeros(len(self.load)) if self.charge is None else (self.charge * self.host).sum(axis=(1, 2))


def _loads(demand: np.ndarray, host: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(count [layers, experts], load [layers, gpus]) of a layer-major layout host [layers, gpus, experts]."""
    count = host.sum(axis=1)
    share = demand / np.maximum(count, 1)
    return count, np.einsum("lge,le->lg", host, share)


def _slots_of(host: np.ndarray, slots: int) -> np.ndarray:
    """[layers, gpus, slots]: the hosted experts of each GPU in id order; host [layers, gpus, experts]."""
    return np.sort(np.where(host, np.arange(host.shape[2]), host.shape[2]), axis=2)[:, :, :slots]


def _unblock(host: np.ndarray, load: np.ndarray, filled: np.ndarray, share: np.ndarray, e: int, slots: int,
             speed: np.ndarray) -> int:
    """Make room for a copy of expert `e` in one layer when every GPU with a free slot already hosts it: such a
    GPU f has fewer experts than any full GPU h without e, so h holds an expert x that f lacks (x != e); x moves
    from h to f, and h's slot is free for e. The (h, x) leaving the two GPUs least busy is taken. host [gpus,
    experts], load [gpus], filled [gpus], share [experts] (demand per copy) are one layer's and updated.
    Returns h."""
    f = int(np.flatnonzero(filled < slots)[0])
    ok = host & ~host[f] & ~host[:, e][:, None]  # [gpus, experts]: x on h, not on f, h lacks e
    worst = np.maximum((load[f] + share[None, :]) / speed[f], (load[:, None] - share[None, :] + share[e])
                       / speed[:, None])
    h, x = np.unravel_index(np.argmin(np.where(ok, worst, np.inf)), ok.shape)
    host[h, x], host[f, x] = False, True
    load[h] -= share[x]
    load[f] += share[x]
    filled[f] += 1
    filled[h] -= 1
    return int(h)


def pack(demand: np.ndarray, speed: np.ndarray, count: np.ndarray, slots: int) -> np.ndarray:
    """host [layers, gpus, experts] bool: each layer's pieces (demand / count, count copies of each expert),
    heaviest first, each onto the GPU it leaves least busy (load / speed) among those with a free slot and no
    copy of its expert (`_unblock` makes one when none is left). demand, count: [layers, experts], count <= gpus
    and summing to gpus x slots."""
    layers, experts = demand.shape
    gpus = len(speed)
    share = demand / count
    owner = np.stack([np.repeat(np.arange(experts), c) for c in count])  # [layers, gpus * slots]
    order = np.argsort(-np.take_along_axis(share, owner, axis=1), axis=1, kind="stable")
    owner = np.take_along_axis(owner, order, 1)
    host = np.zeros((layers, gpus, experts), bool)
    load = np.zeros((layers, gpus))
    filled = np.zeros((layers, gpus), np.int64)
    r = np.arange(layers)
    for e in owner.T:  # the greedy rule is sequential in the pieces, independent across layers
        p = share[r, e]
        blocked = (filled >= slots) | host[r, :, e]
        g = np.argmin(np.where(blocked, np.inf, (load + p[:, None]) / speed), axis=1)
        for l in np.flatnonzero(blocked.all(axis=1)):
            g[l] = _unblock(host[l], load[l], filled[l], share[l], e[l], slots, speed)
        host[r, g, e] = True
        load[r, g] += p
        filled[r, g] += 1
    return host


def _state(demand, speed, host, slots, min_replicas, charge=None, size=None, budget=None) -> _State:
    count, load = _loads(demand, host)
    return _State(demand, speed, min_replicas, _slots_of(host, slots), host, count, load, charge, size,
                  np.inf if budget is None else float(budget))


# ---------------------------------------------------------------------------------------------------- moves


def _cell_terms(table: np.ndarray, b: np.ndarray, eb: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """[n, S, G, S]: the change of `table` ([n, gpus, experts], per-cell cost or bytes) when copy i of the
    busiest GPU b ([n]; its experts eb [n, S]) swaps with the copy in slot (g, j) (experts slot [n, G, S]):
    cells (g, eb_i) and (b, slot_gj) come, (b, eb_i) and (g, slot_gj) go."""
    n, gpus, s = slot.shape
    r = np.arange(n)
    g_ei = np.take_along_axis(table, np.broadcast_to(eb[:, None, :], (n, gpus, s)), axis=2)  # [n, G, S_i]
    b_ej = np.take_along_axis(table[r, b], slot.reshape(n, -1), axis=1).reshape(n, gpus, s)
    b_ei = np.take_along_axis(table[r, b], eb, axis=1)
    g_ej = np.take_along_axis(table, slot, axis=2)
    return (g_ei.transpose(0, 2, 1)[:, :, :, None] + b_ej[:, None] - b_ei[:, :, None, None] - g_ej[:, None])


def _best_swaps(st: _State, li: np.ndarray, costly_level: np.ndarray):
    """Per layer in `li`, the best swap of a copy on the busiest GPU with a copy elsewhere: (found [n] bool,
    b, i, g, j [n] the slots swapped, cost and bytes it adds [n]).

    A swap is taken when it lowers the layer's time plus copy cost, or when it leaves both GPUs it touches below
    the busiest one's time (a level move: the time stays, one GPU fewer sits at the top; this passes ties that
    no single swap lowers). A level move must cost nothing unless `costly_level` ([n] bool) allows it for its
    layer (`improve` keeps the best layout seen, so costly ones that lead nowhere are undone)."""
    n, (gpus, s) = len(li), st.slot.shape[1:]
    r = np.arange(n)
    load, slot, piece, host = st.load[li], st.slot[li], st.piece(li), st.host[li]
    time = load / st.speed
    b = time.argmax(axis=1)
    tb = time[r, b]
    eb, pb = slot[r, b], piece[r, b]
    new_b = (load[r, b][:, None, None, None] - pb[:, :, None, None] + piece[:, None]) / st.speed[b][:, None, None, None]
    new_g = (load[:, None, :, None] + pb[:, :, None, None] - piece[:, None]) / st.speed[None, None, :, None]
    j_on_b = np.take_along_axis(host[r, b], slot.reshape(n, -1), axis=1).reshape(n, 1, gpus, s)
    i_on_g = np.take_along_axis(host, np.broadcast_to(eb[:, None, :], (n, gpus, s)), axis=2)  # g = b included
    ok = ~j_on_b & ~i_on_g.transpose(0, 2, 1)[:, :, :, None]
    others = np.where(np.arange(gpus) == b[:, None], -np.inf, time)
    first = others.argmax(axis=1)
    second = np.where(np.arange(gpus) == first[:, None], -np.inf, others).max(axis=1)
    rest = np.where(np.arange(gpus) == first[:, None], second[:, None], others[r, first][:, None])  # [n, G]
    pair = np.maximum(new_b, new_g)
    dtime = np.maximum(pair, rest[:, None, :, None]) - tb[:, None, None, None]
    cost = np.zeros_like(dtime) if st.charge is None else _cell_terms(st.charge[li], b, eb, slot)
    size = np.zeros_like(dtime) if st.size is None else _cell_terms(st.size[li], b, eb, slot)
    ok &= size <= st.budget_left
    eps = (IMPROVEMENT * tb)[:, None, None, None]
    gain = ok & (dtime + cost < -eps)
    level = ok & ((cost <= 0) | costly_level[:, None, None, None]) & (dtime <= 0) & (pair < tb[:, None, None, None] - eps)
    key = np.where(gain, dtime + cost - (tb[:, None, None, None] + 1), np.where(level, pair - tb[:, None, None, None],
                                                                                  np.inf)).reshape(n, -1)
    best = key.argmin(axis=1)
    i, g, j = np.unravel_index(best, (s, gpus, s))
    flat = lambda a: a.reshape(n, -1)[r, best]  # noqa: E731 - the chosen candidate's entry of a [n, S, G, S] array
    return np.isfinite(key[r, best]), b, i, g, j, flat(dtime + cost), flat(size)


def _apply_swaps(st: _State, li, b, i, g, j, size) -> None:
    """Swap slot (b, i) with slot (g, j) in each layer of `li` (distinct layers)."""
    eb, eg = st.slot[li, b, i], st.slot[li, g, j]
    pb = st.demand[li, eb] / st.count[li, eb]
    pg = st.demand[li, eg] / st.count[li, eg]
    st.slot[li, b, i], st.slot[li, g, j] = eg, eb
    st.host[li, b, eb] = st.host[li, g, eg] = False
    st.host[li, b, eg] = st.host[li, g, eb] = True
    st.load[li, b] += pg - pb
    st.load[li, g] += pb - pg
    st.budget_left -= float(size.sum())
    st.moves["swaps"] += len(li)


def _within_budget(gain: np.ndarray, size: np.ndarray, budget_left: float) -> np.ndarray:
    """[n] bool: which of the layers' moves to take when their bytes together may exceed what is left: all that
    copy nothing, then the best gain per byte first, while they fit."""
    if not np.isfinite(budget_left) or size.sum() <= budget_left:
        return np.ones(len(size), bool)
    order = np.argsort(-gain / np.maximum(size, 1e-300), kind="stable")
    fits = np.cumsum(np.maximum(size[order], 0)) <= budget_left
    take = np.zeros(len(size), bool)
    take[order] = fits
    return take | (size <= 0)


def _count_change_loads(load, host, d, c, g, u, v, grow, shrink) -> np.ndarray:
    """[k, gpus]: one layer's loads after each of k count changes (a copy of u on g replaced by a new copy of
    v): every copy of u grows by `grow`, of v shrinks by `shrink`, and g trades its piece of u for one of v.
    load [gpus], host [gpus, experts], d and c [experts] are the layer's; g, u, v, grow, shrink: [k]."""
    new = load + grow[:, None] * host[:, u].T - shrink[:, None] * host[:, v].T
    new[np.arange(len(g)), g] += d[v] / (c[v] + 1) - d[u] / (c[u] - 1)
    return new


def _count_change(st: _State, l: int, costly_level: bool) -> bool:
    """In layer `l`, the best change of copy counts, made if it lowers the layer's time plus copy cost: a copy
    of expert u that has more than min_replicas copies, in slot (g, j), gives its slot to a new copy of expert
    v (fewer than gpus copies, none on g), which shrinks v's pieces everywhere and grows u's. Tried: v any expert
    on the busiest GPU b with (g, j) any slot, and (g, j) any slot of b with v any expert. Returns whether a
    change was made. A level move (the time stays, fewer GPUs at the top) is taken as with swaps."""
    gpus, s = st.slot.shape[1:]
    experts = st.demand.shape[1]
    d, c, host, load = st.demand[l], st.count[l], st.host[l], st.load[l]
    time = load / st.speed
    b = int(time.argmax())
    cells = np.arange(gpus * s)
    g_a, j_a = np.repeat(cells // s, s), np.repeat(cells % s, s)
    v_a = np.tile(st.slot[l, b], gpus * s)
    g_b, j_b = np.full(s * experts, b), np.repeat(np.arange(s), experts)
    v_b = np.tile(np.arange(experts), s)
    g, j, v = np.concatenate([g_a, g_b]), np.concatenate([j_a, j_b]), np.concatenate([v_a, v_b])
    u = st.slot[l, g, j]
    ok = (c[u] > st.min_replicas) & (c[v] < gpus) & (u != v) & ~host[g, v]
    if st.size is not None:
        ok &= st.size[l, g, v] - st.size[l, g, u] <= st.budget_left
    g, j, u, v = g[ok], j[ok], u[ok], v[ok]
    if not len(g):
        return False
    grow = d[u] / (c[u] - 1) - d[u] / c[u]
    shrink = d[v] / c[v] - d[v] / (c[v] + 1)
    eps = IMPROVEMENT * time[b]
    dtime, cost, at_top = np.zeros(len(g)), np.zeros(len(g)), np.zeros(len(g), np.int64)
    step = max(1, CHUNK // gpus)
    for start in range(0, len(g), step):
        k = slice(start, start + step)
        new = _count_change_loads(load, host, d, c, g[k], u[k], v[k], grow[k], shrink[k]) / st.speed
        dtime[k] = new.max(axis=1) - time[b]
        at_top[k] = (new >= time[b] - eps).sum(axis=1)
    if st.charge is not None:
        cost = st.charge[l, g, v] - st.charge[l, g, u]
    change = dtime + cost
    level = (dtime <= 0) & ((cost <= 0) | costly_level) & (at_top < (time >= time[b] - eps).sum())
    tier = np.where(change < -eps, 0, np.where(level, 1, 2))
    best_k = int(np.lexsort((change, np.where(tier == 1, at_top, 0), tier))[0])
    if tier[best_k] == 2:
        return False
    gk, jk, uk, vk = g[best_k], j[best_k], u[best_k], v[best_k]
    st.load[l] = _count_change_loads(load, host, d, c, g[[best_k]], u[[best_k]], v[[best_k]], grow[[best_k]],
                                     shrink[[best_k]])[0]
    st.slot[l, gk, jk] = vk
    st.host[l, gk, uk], st.host[l, gk, vk] = False, True
    st.count[l, uk] -= 1
    st.count[l, vk] += 1
    if st.size is not None:
        st.budget_left -= float(st.size[l, gk, vk] - st.size[l, gk, uk])
    st.moves["count_changes"] += 1
    return True


class _Best:
    """The best layout seen per layer (time plus copy cost), to return to when costly level moves led nowhere."""

    def __init__(self, st: _State) -> None:
        self.value = st.time() + st.layer_cost()
        self.slot, self.host, self.count, self.load = st.slot.copy(), st.host.copy(), st.count.copy(), st.load.copy()

    def update(self, st: _State) -> np.ndarray:
        """Keep the layers that improved on their best by more than IMPROVEMENT; [layers] bool: which did."""
        value = st.time() + st.layer_cost()
        better = value < self.value - IMPROVEMENT * self.value
        self.value[better] = value[better]
        for mine, theirs in ((self.slot, st.slot), (self.host, st.host), (self.count, st.count),
                             (self.load, st.load)):
            mine[better] = theirs[better]
        return better

    def restore(self, st: _State) -> None:
        """Put every layer back to its best layout."""
        st.slot[:], st.host[:], st.count[:], st.load[:] = self.slot, self.host, self.count, self.load


def improve(st: _State, bound: np.ndarray, deadline: Deadline) -> str:
    """Local search on every layer at once until each is at its bound or no move helps it, or the deadline.
    Swaps run on all open layers each round; a layer no swap improves tries a count change, and is closed when
    that fails too. Returns why it stopped: "bound", "local optimum" or "deadline".

    Level moves (`_best_swaps`) that copy something are allowed in a re-plan without a byte budget, for at most
    LEVEL_STREAK moves per GPU since the layer last improved: ties at the top time would otherwise stop a re-plan
    whose moves each cost a little; the best layout seen is kept and returned, so those moves are paid for by
    the improvement they lead to, or undone. (With a budget, layers' best layouts seen at different times
    could together copy too much, so level moves must be free there.) Every other move lowers the time plus
    copy cost, or keeps both and leaves fewer GPUs at the top, so the search ends."""
    layers, gpus = st.load.shape
    open_ = np.ones(layers, bool)
    best = _Best(st)
    streak = np.zeros(layers, np.int64)
    may_level = st.charge is not None and not np.isfinite(st.budget_left)
    stopped = "local optimum"
    while True:
        open_ &= st.time() + st.layer_cost() > bound * (1 + OPTIMALITY_TOLERANCE)
        if not open_.any():
            break
        if deadline.expired():
            stopped = "deadline"
            break
        st.moves["rounds"] += 1
        li = np.flatnonzero(open_)
        costly = may_level & (streak[li] < LEVEL_STREAK * gpus)
        found = np.zeros(len(li), bool)
        if gpus > 1:  # one GPU: its slots hold every expert, nothing to swap
            found, b, i, g, j, change, size = _best_swaps(st, li, costly)
            take = found & _within_budget(-change, np.where(found, size, 0), st.budget_left)
            if take.any():
                _apply_swaps(st, li[take], b[take], i[take], g[take], j[take], size[take])
        for n in np.flatnonzero(~found):
            if deadline.expired():
                break
            open_[li[n]] = _count_change(st, li[n], bool(costly[n]))
        streak[li] += 1
        streak[best.update(st)] = 0
    best.restore(st)
    if not (st.time() + st.layer_cost() > bound * (1 + OPTIMALITY_TOLERANCE)).any():
        return "bound"
    return stopped


# ---------------------------------------------------------------------------------------------------- exact


def _copy_range(gpus: int, slots: int, experts: int, min_replicas: int) -> np.ndarray:
    """The copy counts an expert can have: min_replicas up to gpus, and no more than the slots leave it when
    every other expert has min_replicas."""
    return np.arange(min_replicas, min(gpus, gpus * slots - min_replicas * (experts - 1)) + 1)


def milp_size(gpus: int, slots: int, experts: int, min_replicas: int) -> int:
    """Variables of `layer_model`: z per (GPU, expert, copy count), y per (expert, copy count), and t."""
    k = len(_copy_range(gpus, slots, experts, min_replicas))
    return gpus * experts * k + experts * k + 1


def layer_model(demand: np.ndarray, speed: np.ndarray, slots: int, min_replicas: int,
                hint: np.ndarray | None = None) -> MilpModel:
    """One layer's exact MILP (demand [experts], speed [gpus]; hint: host [gpus, experts] a layout to start
    from). y[e, k] = 1 when expert e has k copies (one k each); z[g, e, k] = 1 when GPU g holds a copy of e and e
    has k copies, so that copy weighs demand[e] / k, a constant: sum_g z[g, e, k] = k y[e, k]; sum_k z[g, e, k]
    <= 1 (distinct experts); sum_{e, k} z[g, e, k] = slots; sum_{e, k} demand[e] / k z[g, e, k] <= speed[g] t;
    minimise t. Variables: z (g-major, then e, then k), y, t."""
    gpus, experts = len(speed), len(demand)
    ks = _copy_range(gpus, slots, experts, min_replicas)
    nk = len(ks)
    nz, ny = gpus * experts * nk, experts * nk
    z = np.arange(nz).reshape(gpus, experts, nk)
    y = nz + np.arange(ny).reshape(experts, nk)
    t = nz + ny
    ge, ek = np.arange(gpus * experts), np.arange(experts * nk)
    blocks = [  # (row of each entry, variable, coefficient), row numbers local to the block
        (np.repeat(np.arange(experts), nk), y.ravel(), np.ones(ny)),                           # one count each
        (np.concatenate([np.tile(ek, gpus), ek]), np.concatenate([z.ravel(), y.ravel()]),      # copies = k y
         np.concatenate([np.ones(nz), -np.tile(ks, experts)])),
        (np.repeat(np.arange(gpus), experts * nk), z.ravel(), np.ones(nz)),                    # slots per GPU
        (np.append(np.repeat(np.arange(gpus), experts * nk), np.arange(gpus)),                 # load <= speed t
         np.append(z.ravel(), np.full(gpus, t)),
         np.append(np.tile((demand[:, None] / ks[None, :]).ravel(), gpus), -speed)),
        (np.repeat(ge, nk), z.ravel(), np.ones(nz)),                                           # distinct
    ]
    sizes = [experts, experts * nk, gpus, gpus, gpus * experts]
    offset = np.cumsum([0] + sizes[:-1])
    rows = np.concatenate([r + o for (r, _, _), o in zip(blocks, offset)])
    cols = np.concatenate([c for _, c, _ in blocks])
    vals = np.concatenate([v for _, _, v in blocks])
    n = t + 1
    a = sp.csr_matrix((vals, (rows, cols)), shape=(sum(sizes), n))
    row_lb = np.concatenate([np.ones(experts), np.zeros(experts * nk), np.full(gpus, slots), np.full(gpus, -np.inf),
                             np.zeros(gpus * experts)])
    row_ub = np.concatenate([np.ones(experts), np.zeros(experts * nk), np.full(gpus, slots), np.zeros(gpus),
                             np.ones(gpus * experts)])
    c = np.zeros(n)
    c[t] = 1.0
    ub = np.ones(n)
    ub[t] = np.inf
    integer_ = np.ones(n, bool)
    integer_[t] = False
    return MilpModel(c, a, row_lb, row_ub, np.zeros(n), ub, integer_, maximize=False,
                     hint=None if hint is None else _model_hint(demand, speed, hint, ks))


def _model_hint(demand: np.ndarray, speed: np.ndarray, host: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """`layer_model`'s variables for the layout host [gpus, experts]."""
    count = host.sum(axis=0)
    chosen = count[:, None] == ks[None, :]  # [experts, k]
    z = host[:, :, None] & chosen[None]
    load = (host * (demand / count)).sum(axis=1)
    return np.concatenate([z.ravel(), chosen.ravel(), [float((load / speed).max())]]).astype(float)


def solve_small_layers(st: _State, bound: np.ndarray, slots: int, deadline: Deadline) -> np.ndarray:
    """Solve each layer still above its bound exactly when its MILP is small (MILP_VARS), starting from the
    search's layout; a better layout replaces it, and the MILP's proven bound raises the layer's. Layouts with
    move costs are left to the search (the byte budget ties the layers together). Returns the bounds [layers]."""
    layers, gpus, experts = st.host.shape
    if st.charge is not None or milp_size(gpus, slots, experts, st.min_replicas) > MILP_VARS:
        return bound
    bound = bound.copy()
    ks = _copy_range(gpus, slots, experts, st.min_replicas)
    for n, l in enumerate(np.flatnonzero(st.time() > bound * (1 + OPTIMALITY_TOLERANCE))):
        if deadline.expired():
            break
        left = deadline.remaining(1.0 / (layers - n))
        model = layer_model(st.demand[l], st.speed, slots, st.min_replicas, st.host[l])
        sol = BACKENDS["highs"]().solve(model, MILP_SECONDS if left is None else min(left, MILP_SECONDS))
        if sol.bound is not None:
            bound[l] = max(bound[l], sol.bound * (1 - BOUND_SLACK))
        if sol.x is not None and sol.x[-1] < st.time()[l]:
            host = sol.x[:-1 - experts * len(ks)].reshape(gpus, experts, len(ks)).sum(axis=2) > 0.5
            st.host[l] = host
            st.count[l], st.load[l] = host.sum(axis=0), (host * (st.demand[l] / host.sum(axis=0))).sum(axis=1)
            st.slot[l] = _slots_of(host[None], slots)[0]
    return bound


# ---------------------------------------------------------------------------------------------------- solve


def solve_balance(demand, speed, slots_per_layer: int, min_replicas: int = 1, *, deadline: Deadline = UNLIMITED,
                  current=None, add_cost=None, add_bytes=None, budget_bytes=None) -> BalanceResult:
    """A layout with every GPU holding exactly `slots_per_layer` distinct experts per layer that minimises the
    sum over layers of the busiest GPU's time (load / speed), plus in a re-plan the cost of new copies.

    demand: [layers, experts] activations routed to each expert; speed: [gpus] relative throughput (time =
    load / speed); min_replicas: copies every expert keeps. Re-plan: current [gpus, layers, experts] bool, a
    layout with the same slots (the search starts from it); add_cost [gpus, layers, experts] objective units
    (like layer_time) charged per cell hosted that current lacks; add_bytes [layers] bytes of one copy;
    budget_bytes the most bytes copied in all. Stops by `deadline`, returning the best layout so far."""
    d, s = _check_demand(demand), _check_speed(speed)
    layers, experts = d.shape
    gpus = len(s)
    slots, m = _check_slots(slots_per_layer, min_replicas, gpus, experts)
    shape = (gpus, layers, experts)
    if current is None:
        _check_move_terms(None, add_cost, add_bytes, budget_bytes, shape)
        st = _state(d, s, pack(d, s, fewest_largest_pieces(d, gpus, slots, m), slots), slots, m)
    else:
        now = _check_current(current, shape, slots, m)
        cost, size, budget = _check_move_terms(now, add_cost, add_bytes, budget_bytes, shape)
        fresh = ~now.transpose(1, 0, 2)
        st = _state(d, s, now.transpose(1, 0, 2).copy(), slots, m, np.where(fresh, cost.transpose(1, 0, 2), 0.0),
                    np.where(fresh, size[:, None, None], 0).astype(float), budget)
    bound, tight = layer_bounds(d, s, slots, m, st.time())
    stopped = improve(st, bound, deadline)
    exact = solve_small_layers(st, bound, slots, deadline)
    tight = np.where(exact > bound, "milp", tight)
    bound = exact
    time, cost = st.time(), st.layer_cost()
    gaps = [relative_gap(float(v), float(lb), maximize=False) for v, lb in zip(time + cost, bound)]
    hosted = st.host.transpose(1, 0, 2).copy()
    added = 0 if current is None else int((hosted & ~np.asarray(current, bool)).sum())
    extra = {"tight_bound": tight.tolist(), "stopped": stopped, **st.moves, "gap": relative_gap(
        float((time + cost).sum()), float(bound.sum()), maximize=False)}
    if current is not None:
        extra |= {"copy_cost": float(cost.sum()),
                  "copied_bytes": int((hosted & ~np.asarray(current, bool)).sum(axis=(0, 2)) @ np.asarray(
                      np.zeros(layers, np.int64) if add_bytes is None else add_bytes, np.int64))}
    status = "optimal" if all(gap <= OPTIMALITY_TOLERANCE for gap in gaps) else "feasible"
    return BalanceResult(hosted, time, bound, status, added, extra)


def solve_layout_balance(problem: PlacementProblem, deadline: Deadline, moves: MoveTerms | None = None) -> Solution:
    """The `balance` objective of a problem with a slot layout, by `solve_balance` on its demand and server
    speeds, with its proven bound in the objective's units (seconds per token). Re-plan: `moves` prices every new
    copy (its priced bytes x the move cost) and may cap the bytes copied. Under static dispatch the layout is
    balanced for even shares and the objective follows the routing, so no bound of this model is claimed."""
    if problem.layout is None:
        raise PrismError("objective 'balance' plans a serving layout: add a [layout] table with slots_per_layer "
                         "to the cluster file (or choose objective latency or coverage)", parameters=("objective",))
    act = problem.act_seconds
    to_objective = problem.per_token / float(np.mean(1.0 / act)) if act.all() else problem.per_token
    options = {}
    if moves is not None:
        options = {"current": moves.current, "add_cost": moves.cost_per_byte * moves.priced_bytes(problem) /
                   to_objective, "add_bytes": problem.layer_bytes, "budget_bytes": moves.budget_bytes}
    result = solve_balance(problem.demand, problem.speed, problem.layout.slots_per_layer, problem.min_replicas,
                           deadline=deadline, **options)
    evidence = {"stopped": result.extra["stopped"],
                "layers_at_bound": int(sum(g <= OPTIMALITY_TOLERANCE for g in [
                    relative_gap(float(t), float(b), maximize=False)
                    for t, b in zip(result.layer_time, result.layer_bound)]))}
    if not even_dispatch(problem):
        return Solution(result.hosted, "feasible", extra=evidence)
    return Solution(result.hosted, result.status, float(result.layer_bound.sum()) * to_objective, extra=evidence)
