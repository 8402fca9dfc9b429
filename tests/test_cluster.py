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
    ({"server": [server("a", -1.0)]}, "memory_gib.*non-negative"),
    ({"server": [server("a", origins=["x"]), server("b", origins=["x"])]}, "origin 'x' is already served"),
    ({"server": [server("a")], "link": [{"a": "a", "b": "zz", "bandwidth_gbps": 1}]}, "unknown server 'zz'"),
    ({"server": [server("a"), server("b")], "link": [{"a": "a", "b": "b", "bandwidth_gbps": 0}]},
     "bandwidth_gbps.*positive"),
    ({"server": [server("a", memroy_gib=3)]}, "unknown key"),
    ({"server": []}, "no servers"),
    ({"server": [server("a"), server("b"), server("c")], "link": [{"a": "a", "b": "b", "bandwidth_gbps": 1}]},
     "no link or path"),
    ({"server": [server("a", compute_tflops=0)]}, "compute_tflops.*positive"),
    ({"server": [server("a"), server("b")], "matrix": {"bandwidth_gbps": [[0, 1]], "latency_ms": [[0, 0], [0, 0]]}},
     "shape"),
])
def test_validation_errors(doc, message):
    with pytest.raises(PrismError, match=message):
        parse_cluster(doc)


def test_file_errors(tmp_path):
    with pytest.raises(PrismError, match="no cluster file"):
        load_cluster(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[server]\nname=")
    with pytest.raises(PrismError, match="not valid TOML"):
        load_cluster(bad)


def test_hash_ignores_formatting(tmp_path, edge4):
    from prism_plan.studies.bundled import BUNDLED_CLUSTER

    copy = tmp_path / "c.toml"
    copy.write_text("# another comment\n" + BUNDLED_CLUSTER.read_text())
    assert load_cluster(copy).sha256() == edge4.sha256()
