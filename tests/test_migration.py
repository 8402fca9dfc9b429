"""MigrationPlan: ordering under the four invariants, cycle breaking, the verifier, the moves file."""

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_plan.placement.cluster import GIB, parse_cluster
from prism_plan.placement.migration import (content_sha256, MigrationError, MigrationPlan, Stage, needed_copy_bytes,
                                            placement_sha256, plan_migration, verify_migration)
from prism_plan.placement.model import ModelSpec
from prism_plan.placement.plan import Plan

MIB = 2**20


def model(layers: int = 1, experts: int = 3, sizes=None) -> ModelSpec:
    """Experts of 1 MiB (or `sizes` MiB per layer)."""
    size = MIB if sizes is None else tuple(int(x) * MIB for x in sizes)
    return ModelSpec("t", tuple(range(1, layers + 1)), experts, 1, size, 8)


def cluster(slots, bandwidth=None):
    """Servers a, b, c, ... holding `slots` MiB each; links 1 Gbit/s unless `bandwidth` (Gbit/s matrix)."""
    names = "abcdefgh"[:len(slots)]
    doc = {"server": [{"name": n, "memory_gib": s * MIB / GIB} for n, s in zip(names, slots)]}
    if bandwidth is None:
        doc["defaults"] = {"bandwidth_gbps": 1.0, "latency_ms": 0.1}
    else:
        doc["matrix"] = {"bandwidth_gbps": bandwidth, "latency_ms": [[0.1] * len(slots)] * len(slots)}
    return parse_cluster(doc)


def hosted(rows, experts: int = 3) -> np.ndarray:
    """[servers, 1, experts] from one list of expert ids per server."""
    out = np.zeros((len(rows), 1, experts), bool)
    for s, r in enumerate(rows):
        out[s, 0, r] = True
    return out


def test_simple_move_copies_then_evicts_and_verifies():
    old, new = hosted([[0, 1], [2]]), hosted([[0], [1, 2]])
    m = plan_migration(old, new, cluster([2, 2]), model())
    assert m.bytes == m.lower_bound_bytes == MIB and m.num_copies == 1 and m.num_evicts == 1
    assert np.array_equal(m.apply(old), new)
    assert m.stages[0].copies.tolist() == [[0, 1, 0, 1]]  # layer 0, expert 1, a -> b
    assert m.seconds > 0


def test_swap_between_full_servers_parks_in_free_space():
    # a and b are full and swap their only copies; c has one free slot to park an expert in.
    old, new = hosted([[0], [1], [2]]), hosted([[1], [0], [2]])
    m = plan_migration(old, new, cluster([1, 1, 2]), model())
    assert m.temporary_copies == 1
    assert m.bytes == m.lower_bound_bytes + MIB
    verify_migration(m, old, new, cluster([1, 1, 2]))


def test_swap_sets_aside_a_spare_replica():
    # a and b full, swapping their only copies of 0 and 1; expert 2 has a spare copy on a, and c is full.
    old, new = hosted([[0, 2], [1, 2], [2]]), hosted([[1, 2], [0, 2], [2]])
    m = plan_migration(old, new, cluster([2, 2, 1]), model())
    assert m.temporary_copies == 1 and m.bytes == m.lower_bound_bytes + MIB


def test_impossible_swap_says_so():
    old, new = hosted([[0], [1]], 2), hosted([[1], [0]], 2)
    with pytest.raises(MigrationError, match="cannot order the moves.*room for one more expert"):
        plan_migration(old, new, cluster([1, 1]), model(experts=2))


def test_new_placement_below_min_replicas_is_refused():
    with pytest.raises(MigrationError, match="fewer than min_replicas=2"):
        plan_migration(hosted([[0, 1, 2], [0, 1, 2]]), hosted([[0, 1, 2], [0, 1]]), cluster([3, 3]), model(), 2)


def test_copy_reads_from_the_cheapest_holder():
    # c needs expert 0, held by a (slow link to c) and b (fast link to c).
    bw = [[0, 10, 0.1], [10, 0, 10], [0.1, 10, 0]]
    old, new = hosted([[0, 2], [0], [1]]), hosted([[0, 2], [0], [1, 0]])
    m = plan_migration(old, new, cluster([2, 1, 2], bw), model())
    assert m.stages[0].copies[0, 2] == 1


# The verifier rejects hand-made plans that break each invariant.

def _plan(stages, r=1, mdl=None):
    mdl = mdl or model()
    return MigrationPlan(mdl, ("a", "b", "c"), [Stage.make(*s) for s in stages], r, 0, [0.0] * len(stages))


def test_verifier_rejects_a_copy_without_room():
    old, new = hosted([[0], [1], []]), hosted([[0, 1], [1], []])
    with pytest.raises(MigrationError, match="without room"):
        verify_migration(_plan([((), [(0, 1, 1, 0)])]), old, new, cluster([1, 1, 1]))


def test_verifier_rejects_dropping_below_min_replicas():
    old, new = hosted([[0], [1], [2]]), hosted([[1], [0], [2]])
    bad = _plan([([(0, 0, 0)], ()), ((), [(0, 1, 1, 0)]), ([(0, 1, 1)], ())])  # evicts the only copy of 0
    with pytest.raises(MigrationError, match="fewer than min_replicas"):
        verify_migration(bad, old, new, cluster([1, 1, 1]))


def test_verifier_rejects_a_dearer_source():
    bw = [[0, 10, 0.1], [10, 0, 10], [0.1, 10, 0]]
    old, new = hosted([[0, 2], [0], [1]]), hosted([[0, 2], [0], [1, 0]])
    with pytest.raises(MigrationError, match="but a holder sends it"):
        verify_migration(_plan([((), [(0, 0, 0, 2)])]), old, new, cluster([2, 1, 2], bw))


def test_verifier_rejects_plans_that_miss_the_new_placement():
    old, new = hosted([[0, 1], [2], []]), hosted([[0], [1, 2], []])
    with pytest.raises(MigrationError, match="keeps expert 1"):
        verify_migration(_plan([((), [(0, 1, 0, 1)])]), old, new, cluster([2, 2, 1]))


def test_verifier_rejects_copies_from_a_server_just_evicted():
    old, new = hosted([[0, 1], [2], [1]]), hosted([[0], [1, 2], [1]])
    bad = _plan([([(0, 1, 0)], [(0, 1, 0, 1)])])
    with pytest.raises(MigrationError, match="does not hold it once the stage's evictions are done"):
        verify_migration(bad, old, new, cluster([2, 2, 1]))


def test_verifier_rejects_evicting_what_is_not_there():
    old = hosted([[0], [1], [2]])
    with pytest.raises(MigrationError, match="not held"):
        verify_migration(_plan([([(0, 2, 0)], ())]), old, old, cluster([1, 1, 1]))


def test_moves_file_round_trip(tmp_path):
    old, new = hosted([[0], [1], [2]]), hosted([[1], [0], [2]])
    c = cluster([1, 1, 2])
    m = plan_migration(old, new, c, model())
    m.save(tmp_path / "m.json")
    back = MigrationPlan.load(tmp_path / "m.json")
    verify_migration(back, old, new, c)
    assert back.summary() == m.summary()
    assert back.to_dict()["stages"][0]["steps"][0]["op"] == "copy"
    assert (back.from_placement_sha256, back.to_placement_sha256) == (placement_sha256(old), placement_sha256(new))
    assert back.sha256() == m.sha256()


def plan_of(hosted: np.ndarray) -> Plan:
    """A plan of `hosted` on servers a, b, c, ... without routing."""
    return Plan(model(hosted.shape[1], hosted.shape[2]), tuple("abcdefgh"[:len(hosted)]), (), hosted,
                np.zeros((0,) + hosted.shape[1:], np.int64), "coverage", {})


def test_moves_are_tied_to_their_plans():
    old, new = hosted([[0], [1], [2]]), hosted([[1], [0], [2]])
    c = cluster([1, 1, 2])
    m = plan_migration(old, new, c, model())
    assert np.array_equal(m.starting_placement(plan_of(new), c), old)
    with pytest.raises(MigrationError, match="lead to another plan"):
        m.starting_placement(plan_of(old), c)
    d = m.to_dict()
    copy = next(s for st in d["stages"] for s in st["steps"] if s["op"] == "copy")
    copy["expert"] = (copy["expert"] + 1) % 3  # one copy's expert changed: the moves start elsewhere
    with pytest.raises(MigrationError, match="was edited after `prism-plan migrate` wrote it"):
        MigrationPlan.from_dict(d)
    d["content_sha256"] = content_sha256(d)  # resealed: the placements still tell
    with pytest.raises(MigrationError, match="do not start where they say"):
        MigrationPlan.from_dict(d).starting_placement(plan_of(new), c)
    plain = MigrationPlan(m.model, m.servers, m.stages, 1, 0, m.stage_seconds)  # made without placements
    with pytest.raises(MigrationError, match="do not record the placements"):
        plain.starting_placement(plan_of(new), c)


@pytest.mark.parametrize("change, says", [
    (lambda d: d.update(version=1), "version-1 moves file"),
    (lambda d: d["stages"][0]["steps"][0].update(expert=True), "must be an integer"),
    (lambda d: d["stages"][0]["steps"][0].update(bytes=1), '"bytes" is 1 but'),
    (lambda d: d["stages"][0]["steps"][0].update(dst="z"), "must be one of the servers"),
    (lambda d: d.update(copies=7), '"copies" is 7 but its steps make'),
])
def test_edited_moves_files_are_refused_when_read(change, says):
    old, new = hosted([[0], [1], [2]]), hosted([[1], [0], [2]])
    d = plan_migration(old, new, cluster([1, 1, 2]), model()).to_dict()
    change(d)
    with pytest.raises(MigrationError, match=says):
        MigrationPlan.from_dict(d, where="m.json")


# Random small clusters and placements.

@st.composite
def migrations(draw, uniform=True):
    s = draw(st.integers(2, 4))
    l = draw(st.integers(1, 2))
    e = draw(st.integers(2, 4))
    r = draw(st.integers(1, min(2, s)))
    sizes = [1] * l if uniform else draw(st.lists(st.integers(1, 3), min_size=l, max_size=l))

    def placement():
        x = np.zeros((s, l, e), bool)
        for li in range(l):
            for ei in range(e):
                k = draw(st.integers(r, s))
                x[draw(st.permutations(range(s)))[:k], li, ei] = True
        return x

    old, new = placement(), placement()
    mem = lambda h: (h.sum(axis=2) * np.array(sizes)).sum(axis=1)  # noqa: E731
    spare = np.array(draw(st.lists(st.integers(0, 2), min_size=s, max_size=s)))
    return old, new, cluster((np.maximum(mem(old), mem(new)) + spare).tolist()), model(l, e, sizes), r


def reachable(old, new, c, mdl, r) -> bool:
    """Whether single copies and evictions can reach `new` without breaking memory or min_replicas
    (breadth-first over placements; tiny cases only)."""
    size = np.broadcast_to(mdl.layer_bytes[None, :, None], old.shape)
    start, goal = old.tobytes(), new.tobytes()
    seen, queue = {start}, deque([old])
    while queue:
        x = queue.popleft()
        if x.tobytes() == goal:
            return True
        mem, count = (x * size).sum(axis=(1, 2)), x.sum(axis=0)
        for cell in np.ndindex(x.shape):
            s, l, e = cell
            if x[cell] and count[l, e] <= r or not x[cell] and mem[s] + size[cell] > c.budgets[s]:
                continue
            y = x.copy()
            y[cell] = ~y[cell]
            if y.tobytes() not in seen:
                seen.add(y.tobytes())
                queue.append(y)
    return False


@settings(max_examples=150, deadline=None)
@given(migrations(uniform=True))
def test_random_migrations_keep_every_invariant(case):
    old, new, c, mdl, r = case
    try:
        m = plan_migration(old, new, c, mdl, r)
    except MigrationError:
        if old.size <= 12:  # a refusal must be a real impossibility
            assert not reachable(old, new, c, mdl, r)
        return
    verify_migration(m, old, new, c)
    lower = needed_copy_bytes(old, new, mdl.layer_bytes)
    assert m.lower_bound_bytes == lower <= m.bytes
    # Every byte above the bound is a temporary copy, and there are never more of those than real copies.
    assert m.bytes == lower + m.temporary_copies * int(mdl.layer_bytes[0])
    assert m.temporary_copies <= max(1, lower // int(mdl.layer_bytes[0]))


@settings(max_examples=100, deadline=None)
@given(migrations(uniform=False))
def test_random_migrations_with_mixed_sizes_keep_every_invariant(case):
    old, new, c, mdl, r = case
    try:
        m = plan_migration(old, new, c, mdl, r)
    except MigrationError:
        return
    verify_migration(m, old, new, c)
    assert m.bytes >= m.lower_bound_bytes
