import numpy as np
import pytest

from prism_plan.errors import PrismError
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.traces.tables import ActivationTables, build_tables
from prism_plan.traces.trace import load_trace


def test_table_sums(esft_tables):
    t = esft_tables
    assert t.freq.shape == (4, 26, 64) and t.coact.shape == (26, 64, 64) and t.trans.shape == (25, 64, 64)
    assert list(t.tokens) == [8222, 8327, 8479, 8251]
    # every token activates top_k experts in every layer
    assert np.array_equal(t.freq.sum(axis=2), np.repeat(t.tokens[:, None], 26, axis=1) * 6)
    assert np.array_equal(np.diagonal(t.coact, axis1=1, axis2=2), t.freq.sum(axis=0))
    assert np.array_equal(t.coact, t.coact.transpose(0, 2, 1))
    # each activation of e pairs with the other k - 1 experts of its token
    off = t.coact.sum(axis=2) - np.diagonal(t.coact, axis1=1, axis2=2)
    assert np.array_equal(off, 5 * t.freq.sum(axis=0))
    # each activation of e at layer i pairs with the k experts of layer i + 1
    assert np.array_equal(t.trans.sum(axis=2), 6 * t.freq.sum(axis=0)[:-1])
    assert np.array_equal(t.trans.sum(axis=1), 6 * t.freq.sum(axis=0)[1:])


def test_pairs_match_direct_count():
    trace = load_trace(BUNDLED_TRACE).select(np.arange(300))
    t = build_tables([trace])
    coact = np.zeros((26, 64, 64))
    trans = np.zeros((25, 64, 64))
    for tok in trace.experts:
        for l in range(26):
            for a in tok[l]:
                for b in tok[l]:
                    coact[l, a, b] += 1
                if l < 25:
                    for b in tok[l + 1]:
                        trans[l, a, b] += 1
    assert np.array_equal(t.coact, coact) and np.array_equal(t.trans, trans)


def test_batches_accumulate_like_one_pass():
    trace = load_trace(BUNDLED_TRACE)
    whole = build_tables([trace])
    parts = build_tables([trace.select(np.arange(0, 10000)), trace.select(np.arange(10000, trace.num_tokens))])
    assert np.array_equal(whole.freq, parts.freq) and np.array_equal(whole.coact, parts.coact)
    assert np.array_equal(whole.trans, parts.trans)


def test_save_load_round_trip(tmp_path, esft_tables):
    esft_tables.save(tmp_path / "t.npz")
    back = ActivationTables.load(tmp_path / "t.npz")
    assert back.origins == esft_tables.origins and back.layers == esft_tables.layers
    assert back.sha256() == esft_tables.sha256()
    assert back.meta["model"] == "deepseek-v2-lite" and back.top_k == 6


def test_load_errors(tmp_path):
    with pytest.raises(PrismError, match="no tables file"):
        ActivationTables.load(tmp_path / "none.npz")
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(PrismError, match="missing array"):
        ActivationTables.load(tmp_path / "x.npz")
    (tmp_path / "y.npz").write_text("junk")
    with pytest.raises(PrismError, match="not a prism-plan tables file"):
        ActivationTables.load(tmp_path / "y.npz")


def test_shape_checks():
    with pytest.raises(PrismError, match="tokens has shape"):
        ActivationTables(("a",), (1, 2), np.zeros((1, 2, 4)), np.zeros(2, np.int64))


@pytest.mark.parametrize("change, message", [
    (dict(freq=np.full((1, 2, 4), np.nan)), "finite"),
    (dict(freq=-np.ones((1, 2, 4))), "not negative"),
    (dict(freq=np.zeros((1, 2, 4)), tokens=np.zeros(1, np.int64)), "no tokens"),
    (dict(freq=np.full((1, 2, 4), 5.0)), "do not belong together"),  # 20 activations per layer from 2 tokens x top-2
    (dict(coact=np.full((2, 4, 4), 1e6)), "more than the 2 tokens"),
])
def test_counts_no_solver_can_use_are_refused(change, message):
    good = dict(freq=np.ones((1, 2, 4)), tokens=np.array([2]), coact=np.ones((2, 4, 4)))
    with pytest.raises(PrismError, match=message):
        ActivationTables(("a",), (1, 2), **{**good, **change}, meta={"top_k": 2})


def test_damaged_files_are_not_tables(tmp_path, esft_tables):
    esft_tables.save(tmp_path / "t.npz")
    data = (tmp_path / "t.npz").read_bytes()
    for name, content in [("cut.npz", data[:len(data) // 2]), ("empty.npz", b""), ("noise.npz", bytes(range(256)))]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PrismError, match=f"{name} is not a prism-plan tables file"):
            ActivationTables.load(tmp_path / name)
