"""Tables of many trace files: parallel builds (processes, Dask) equal one build over all rows, bit for bit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prism_plan.cli import main
from prism_plan.errors import PrismError
from prism_plan.studies.bundled import BUNDLED_TRACE
from prism_plan.traces.parallel import expand_inputs, merge_tables, tables_of_files, window_tables_of_files
from prism_plan.traces.tables import ActivationTables, build_tables
from prism_plan.traces.trace import Trace, TraceMeta, load_trace
from prism_plan.traces.windows import window_tables


@pytest.fixture(scope="module")
def whole():
    return load_trace(BUNDLED_TRACE)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, whole):
    """The bundled trace split by request into four files, part-0.parquet .. part-3.parquet."""
    d = tmp_path_factory.mktemp("parts")
    a, b = whole.split_requests(0.5)
    pieces = [*a.split_requests(0.5), *b.split_requests(0.4)]
    for i, p in enumerate(pieces):
        p.save(d / f"part-{i}.parquet")
    return d


def same(a: ActivationTables, b: ActivationTables) -> None:
    assert a.origins == b.origins and a.layers == b.layers
    for name in ("freq", "tokens", "coact", "trans"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.meta["requests"] == b.meta["requests"]


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_tables_of_the_whole_trace(parts, esft_tables, workers):
    same(tables_of_files(sorted(parts.glob("*.parquet")), workers=workers), esft_tables)


def test_dask_local_cluster_gives_the_same_tables(parts, esft_tables):
    pytest.importorskip("dask.distributed")
    same(tables_of_files(parts, workers=2, engine="dask"), esft_tables)


def test_folder_glob_and_list_inputs(parts):
    files = [parts / f"part-{i}.parquet" for i in range(4)]
    assert expand_inputs(parts) == files
    assert expand_inputs(str(parts / "part-*.parquet")) == files
    assert expand_inputs([files[2], str(parts / "part-[01].parquet")]) == [files[2], files[0], files[1]]
    with pytest.raises(PrismError, match="named twice"):
        expand_inputs([parts, files[0]])


def test_merge_is_an_exact_sum(whole):
    a, b = whole.split_requests(0.3)
    merged = merge_tables([build_tables([b]), build_tables([a])])
    same(merged, merge_tables([build_tables([b.select(slice(0, 10)), b.select(slice(10, None))]),
                               build_tables([a])]))
    assert merged.origins == build_tables([b]).origins
    assert merged.tokens.sum() == whole.num_tokens


def test_window_i_sums_window_i_of_every_file(parts, tmp_path):
    files = [parts / "part-2.parquet", parts / "part-3.parquet"]  # 6562 and 9429 tokens
    each = [list(window_tables(f, 2500)) for f in files]
    assert len(each[0]) != len(each[1])  # the rule for the longer file's later windows is tested too
    merged = window_tables_of_files(files, 2500, workers=2)
    assert len(merged) == max(map(len, each))
    for i, w in enumerate(merged):
        mine = [ws[i] for ws in each if i < len(ws)]
        assert np.array_equal(w.freq.sum(axis=0), sum(t.freq.sum(axis=0) for t in mine))
        assert np.array_equal(w.coact, sum(t.coact for t in mine))
        assert w.meta["window"]["index"] == i and w.meta["window"]["tokens"] == sum(t.tokens.sum() for t in mine)


def test_cli_several_files_and_windows(parts, esft_tables, tmp_path, capsys):
    code = main(["profile", "tables", str(parts / "part-[01].parquet"), str(parts / "part-[23].parquet"),
                 "-o", str(tmp_path / "t.npz"), "--workers", "2", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["tokens"] == esft_tables.tokens.tolist()
    same(ActivationTables.load(tmp_path / "t.npz"), esft_tables)
    assert main(["profile", "tables", str(parts), "--window", "4000", "-o", str(tmp_path / "win"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "win" / "manifest.json").read_text())
    assert len(manifest["trace"]) == 4 and manifest["windows"][0] == "window-0000.npz"


def other_model(path):
    meta = TraceMeta("other", (1, 2), 8, 2)
    experts = np.tile(np.array([[0, 1], [2, 3]], np.int16), (5, 1, 1))
    Trace(meta, ("a",), np.zeros(5, np.int32), np.arange(5), np.zeros(5, np.int32), np.zeros(5, bool),
          experts).save(path)


@pytest.mark.parametrize("case", ["no match", "empty folder", "missing", "mixed models", "bad engine"])
def test_bad_inputs_give_one_error_line(parts, tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    other_model(tmp_path / "other.parquet")
    args = {"no match": [str(tmp_path / "nothing-*.parquet")], "empty folder": [str(tmp_path / "empty")],
            "missing": [str(parts / "part-0.parquet"), str(tmp_path / "gone.parquet")],
            "mixed models": [str(parts / "part-0.parquet"), str(tmp_path / "other.parquet")],
            "bad engine": [str(parts), "--workers", "1", "--scheduler", "tcp://localhost:1"]}[case]
    assert main(["profile", "tables", *args, "-o", str(tmp_path / "t.npz"), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "other.parquet" in err if case == "mixed models" else True
    assert not (tmp_path / "t.npz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other.parquet"]


def test_sampling_each_file_samples_the_whole_trace(parts, whole):
    from prism_plan.traces.sampling import sampled

    kept = build_tables(sampled([whole], fraction=0.3))
    same(tables_of_files(parts, fraction=0.3, workers=2), kept)
    assert tables_of_files(parts, max_tokens=1001, workers=1).tokens.sum() == 1001
    with pytest.raises(PrismError, match="fraction"):
        tables_of_files(parts, fraction=1.5)


def test_ctrl_c_stops_the_workers_at_once(whole, tmp_path):
    big = tmp_path / "in" / "rank-0.parquet"
    big.parent.mkdir()
    Trace.concat([whole] * 8).save(big)
    for i in range(1, 4):
        shutil.copy(big, big.with_name(f"rank-{i}.parquet"))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from prism_plan.cli import main; sys.exit(main())",
                             "profile", "tables", str(big.parent), "--workers", "2", "-o", "t.npz"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while not workers_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    workers = workers_of(proc.pid)
    assert workers and proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the group
    start = time.monotonic()
    assert proc.wait(10) == 130 and time.monotonic() - start < 2
    assert "interrupted (SIGINT)" in proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    deadline = time.monotonic() + 3  # the forkserver and resource tracker end once they see the parent gone
    while [p for p in workers if running(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if running(p)], [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in workers]


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def workers_of(pid: int) -> list[int]:
    """The processes below `pid` (its forkserver's children are the pool's workers)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    parent = dict(zip(map(int, out[0::2]), map(int, out[1::2])))
    below, grew = {pid}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in below} - below
        below |= new
        grew = bool(new)
    return sorted(below - {pid})


def test_dask_missing_says_how_to_install(parts, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # what an install without dask gives
    with pytest.raises(PrismError, match=r"pip install 'prism-plan\[dask\]'"):
        tables_of_files(parts, engine="dask")
