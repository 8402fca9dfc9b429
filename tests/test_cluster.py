import numpy as np
import pytest

from prism_plan.errors import PrismError
from prism_plan.placement.cluster import GIB, load_cluster, parse_cluster


def server(name, mem=1.0, **kw):
    return {"name": name, "memory_gib": mem, **kw}


def test_bundled_cluster(edge4):
    assert edge4.names == ["edge-a", "edge-b", "edge-c", "edge-d"]
    assert list(edge4.budgets) == [6 * GIB, 8 * GIB, 10 * GIB, 12 * GIB]
    assert edge4.origin_server == {"intent": 0, "law": 1, "summary": 2, "translation": 3}
    # A listed link overrides the defaults, symmetrically; unlisted pairs use the defaults.
    assert edge4.bandwidth[2, 3] == edge4.bandwidth[3, 2] == 10e9 / 8
    assert edge4.latency[0, 3] == pytest.approx(2e-3)
    assert np.isinf(np.diag(edge4.bandwidth)).all() and (np.diag(edge4.latency) == 0).all()


def test_default_origin_is_server_name():
    c = parse_cluster({"server": [server("a"), server("b")]} | {"defaults": {}})
    assert c.origin_server == {"a": 0, "b": 1}


def test_topology_paths_add_latency_and_take_narrowest_link():
    doc = {"server": [server("a"), server("b"), server("c")],
           "link": [{"a": "a", "b": "b", "bandwidth_gbps": 8.0, "latency_ms": 1.0},
                    {"a": "b", "b": "c", "bandwidth_gbps": 2.0, "latency_ms": 3.0}]}
    c = parse_cluster(doc)
    assert c.latency[0, 2] == pytest.approx(4e-3)
    assert c.bandwidth[0, 2] == pytest.approx(2e9 / 8)


def test_matrix_links():
    doc = {"server": [server("a"), server("b")],
           "matrix": {"bandwidth_gbps": [[0, 4], [8, 0]], "latency_ms": [[0, 1], [2, 0]]}}
    c = parse_cluster(doc)
    assert c.bandwidth[0, 1] == 4e9 / 8 and c.bandwidth[1, 0] == 8e9 / 8 and c.latency[1, 0] == 2e-3


def test_one_way_link():
    doc = {"defaults": {"bandwidth_gbps": 1.0}, "server": [server("a"), server("b")],
           "link": [{"a": "a", "b": "b", "bandwidth_gbps": 9.0, "one_way": True}]}
    c = parse_cluster(doc)
    assert c.bandwidth[0, 1] == 9e9 / 8 and c.bandwidth[1, 0] == 1e9 / 8


@pytest.mark.parametrize("doc, message", [
    ({"server": [server("a"), server("a")]}, "duplicate server name"),
    ({"server": [server("a", -1.0)]}, "memory_gib` must be a finite number from 0 to"),
    ({"server": [server("a", origins=["x"]), server("b", origins=["x"])]}, "origin 'x' is already served"),
    ({"server": [server("a")], "link": [{"a": "a", "b": "zz", "bandwidth_gbps": 1}]}, "`b` must name a server or a node, got 'zz'"),
    ({"server": [server("a"), server("b")], "link": [{"a": "a", "b": "b", "bandwidth_gbps": 0}]},
     "bandwidth_gbps` must be a finite number from 1e-06"),
    ({"server": [server("a", memroy_gib=3)]}, "unknown key"),
    ({"server": []}, "no servers"),
    ({"server": [server("a"), server("b"), server("c")], "link": [{"a": "a", "b": "b", "bandwidth_gbps": 1}]},
     "no link or path"),
    ({"server": [server("a", compute_tflops=0)]}, "compute_tflops` must be a finite number from 1e-06"),
    ({"server": [server("a"), server("b")], "matrix": {"bandwidth_gbps": [[0, 1]], "latency_ms": [[0, 0], [0, 0]]}},
     "2 x 2 list of lists"),
])
def test_validation_errors(doc, message):
    with pytest.raises(PrismError, match=message):
        parse_cluster(doc)


TWO = [server("a"), server("b")]
LINK = {"a": "a", "b": "b", "bandwidth_gbps": 1.0, "latency_ms": 1.0}


@pytest.mark.parametrize("doc, message", [
    ({"server": [server("a", float("nan"))]}, "server 'a': `memory_gib` must be a finite number"),
    ({"server": [server("a", 1e30)]}, "`memory_gib` must be a finite number from 0 to 1e\\+06, got 1e\\+30"),
    ({"server": [server("a", True)]}, "`memory_gib` must be a finite number .*got True"),
    ({"server": [server("a", "8")]}, "`memory_gib` must be a finite number .*got '8'"),
    ({"server": [server("a", compute_tflops=float("inf"))]}, "`compute_tflops` must be a finite number"),
    ({"server": TWO, "defaults": {"bandwidth_gbps": float("nan")}}, r"\[defaults\]: `bandwidth_gbps` must be a finite"),
    ({"server": TWO, "defaults": {"latency_ms": -1}}, r"\[defaults\]: `latency_ms` must be a finite number from 0"),
    ({"server": TWO, "link": [{**LINK, "latency_ms": float("nan")}]}, r"link #1 \('a'-'b'\): `latency_ms`"),
    ({"server": TWO, "link": [{**LINK, "one_way": "yes"}]}, "`one_way` must be true or false, got 'yes'"),
    ({"server": TWO, "link": [{**LINK, "one_way": 1}]}, "`one_way` must be true or false, got 1"),
    ({"server": TWO, "link": [LINK, {**LINK, "bandwidth_gbps": 5.0}]},
     "link #1 already sets 'a' -> 'b' \\(with other values\\); list each pair once"),
    ({"server": TWO, "link": [LINK, dict(LINK)]}, "with the same values"),
    ({"server": TWO, "link": [LINK, {**LINK, "a": "b", "b": "a", "one_way": True}]}, "link #1 already sets 'b' -> 'a'"),
    ({"server": TWO, "link": [{"b": "b", "bandwidth_gbps": 1.0}]}, "`a` must name a server or a node, got None"),
    ({"server": TWO, "link": {"a": "a"}}, "must be written as \\[\\[link\\]\\] tables"),
    ({"server": [1, 2]}, "must be written as \\[\\[server\\]\\] tables"),
    ({"server": TWO, "defaults": 5}, r"\[defaults\]: must be a table"),
    ({"server": TWO, "name": 4}, "`name` must be a non-empty string, got 4"),
    ({"server": [server("")]}, "server #1: `name` must be a non-empty string"),
    ({"server": [server("a", origins=["x", "x"])]}, "origin 'x' is twice"),
    ({"server": TWO, "matrix": {"bandwidth_gbps": [[0, float("nan")], [1, 0]], "latency_ms": [[0, 0], [0, 0]]}},
     "`bandwidth_gbps` row 1 column 2 \\('a' -> 'b'\\) must be a finite number"),
    ({"server": TWO, "matrix": {"bandwidth_gbps": [[0, "1"], [1, 0]], "latency_ms": [[0, 0], [0, 0]]}},
     "row 1 column 2 .*got '1'"),
    ({"server": TWO, "matrix": {"bandwidth_gbps": [[0, 1], [1, 0]], "latency_ms": [[0, 1e30], [0, 0]]}},
     "`latency_ms` row 1 column 2"),
    ({"server": TWO, "matrix": {"bandwidth_gbps": [[float("nan"), 1], [1, 0]], "latency_ms": [[0, 0], [0, 0]]}},
     "row 1 column 1 .*must be a number"),
    ({"server": TWO, "matrix": {"bandwidth_gbps": [[0, 1], [1, 0]], "latency_ms": [[0, 0], [0, 0]]},
      "link": [LINK]}, "drop the \\[\\[link\\]\\], \\[\\[node\\]\\] and \\[defaults\\] tables or the \\[matrix\\]"),
])
def test_numbers_types_and_duplicates_are_refused(doc, message):
    with pytest.raises(PrismError, match=message):
        parse_cluster(doc)


def test_opposite_one_way_links_and_an_infinite_diagonal_are_fine():
    c = parse_cluster({"server": TWO, "link": [{**LINK, "one_way": True},
                                               {**LINK, "a": "b", "b": "a", "one_way": True, "latency_ms": 3.0}]})
    assert c.latency[0, 1] == pytest.approx(1e-3) and c.latency[1, 0] == pytest.approx(3e-3)
    c = parse_cluster({"server": TWO, "matrix": {"bandwidth_gbps": [[float("inf"), 1], [1, float("inf")]],
                                                 "latency_ms": [[0, 0], [0, 0]]}})
    assert c.bandwidth[0, 1] == 1e9 / 8


def test_file_errors(tmp_path):
    with pytest.raises(PrismError, match="no cluster file"):
        load_cluster(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[server]\nname=")
    with pytest.raises(PrismError, match="not valid TOML"):
        load_cluster(bad)
    bad.write_text('[[server]]\nname = "a"\nmemory_gib = nan\n')
    with pytest.raises(PrismError, match=f"^{bad}: server 'a': `memory_gib`"):
        load_cluster(bad)


def test_hash_ignores_formatting(tmp_path, edge4):
    from prism_plan.studies.bundled import BUNDLED_CLUSTER

    copy = tmp_path / "c.toml"
    copy.write_text("# another comment\n" + BUNDLED_CLUSTER.read_text())
    assert load_cluster(copy).sha256() == edge4.sha256()


def test_servers_name_their_node():
    c = parse_cluster({"defaults": {}, "server": [server("a", node="n1"), server("b"), server("c", node="n0"),
                                                  server("d", node="n1")]})
    assert c.node_index.tolist() == [0, 1, 2, 0]  # a server without `node` is a node of its own
    assert [s.node for s in c.servers] == ["n1", "", "n0", "n1"]
    assert "node" not in c.to_dict()["servers"][1] and c.to_dict()["servers"][0]["node"] == "n1"
    plain = parse_cluster({"defaults": {}, "server": [server("a"), server("b")]})
    assert plain.node_index.tolist() == [0, 1] and "node" not in plain.to_dict()["servers"][0]
    for bad in ("", 3):
        with pytest.raises(PrismError, match="server 'a': `node` must be a non-empty string"):
            parse_cluster({"defaults": {}, "server": [server("a", node=bad)]})
