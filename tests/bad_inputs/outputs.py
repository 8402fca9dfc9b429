"""Outputs that would destroy an input, collide with each other or cannot be written: refused before any work."""

from __future__ import annotations

import os
from pathlib import Path

from bad_inputs import Case, writes

SOLVE = ("solve", "--tables", "tables-0.npz", "--cluster", "cluster.toml")
MIGRATE = ("migrate", "--plan", "plan-0.json", "--tables", "tables-1.npz", "--cluster", "cluster.toml")
SIMULATE = ("simulate", "--plan", "plan-0.json", "--trace", "trace.parquet", "--cluster", "cluster.toml")
LONG = "x" * 300


def link(name: str, to: str):
    def setup(d: Path) -> None:
        os.symlink(d / to, d / name)
    return setup


def folder(name: str, *files: str):
    def setup(d: Path) -> None:
        (d / name).mkdir(parents=True)
        for f in files:
            (d / name / f).write_text("keep me")
    return setup


def window_set_holding_the_trace(d: Path) -> None:
    (d / "win").mkdir()
    (d / "win" / "manifest.json").write_text('{"format": "prism-plan/windows", "version": 1, '
                                             '"windows": ["trace.parquet"]}')
    os.replace(d / "trace.parquet", d / "win" / "trace.parquet")


CASES = [
    Case("outputs-solve-over-tables", (*SOLVE, "-o", "tables-0.npz"), "is also an input"),
    Case("outputs-solve-over-cluster", (*SOLVE, "-o", "cluster.toml"), "is also an input"),
    Case("outputs-solve-over-tables-by-another-spelling", (*SOLVE, "-o", "./model/../tables-0.npz"),
         "is also an input"),
    Case("outputs-solve-over-tables-through-a-link", (*SOLVE, "-o", "link.npz"), "is also an input",
         link("link.npz", "tables-0.npz")),
    Case("outputs-solve-over-start", (*SOLVE, "--solver", "local-search", "--objective", "traffic", "--trace",
                                      "trace.parquet", "--start", "plan-0.json", "-o", "plan-0.json"),
         "is also an input"),
    Case("outputs-solve-over-trace", (*SOLVE, "--trace", "trace.parquet", "-o", "trace.parquet"), "is also an input"),
    Case("outputs-solve-into-a-folder", (*SOLVE, "-o", "model"), "is a folder"),
    Case("outputs-solve-under-a-file", (*SOLVE, "-o", "plan-0.json/plan.json"), "is a file"),
    Case("outputs-solve-name-too-long", (*SOLVE, "-o", LONG + ".json"), "too long; use a shorter name"),
    Case("outputs-solve-folder-name-too-long", (*SOLVE, "-o", LONG + "/plan.json"),
         "too long; use a shorter name"),
    Case("outputs-migrate-over-old-plan", (*MIGRATE, "-o", "plan-0.json", "--moves", "moves.json"), "is also an input"),
    Case("outputs-migrate-moves-over-old-plan", (*MIGRATE, "-o", "new.json", "--moves", "plan-0.json"),
         "is also an input"),
    Case("outputs-migrate-over-tables", (*MIGRATE, "-o", "tables-1.npz", "--moves", "moves.json"), "is also an input"),
    Case("outputs-migrate-moves-equal-plan", (*MIGRATE, "-o", "new.json", "--moves", "new.json"), "two outputs"),
    Case("outputs-migrate-moves-equal-plan-spelt-twice", (*MIGRATE, "-o", "new.json", "--moves", "./new.json"),
         "two outputs"),
    Case("outputs-migrate-moves-into-folder", (*MIGRATE, "-o", "new.json", "--moves", "model"), "is a folder"),
    Case("outputs-migrate-moves-name-too-long", (*MIGRATE, "-o", "new.json", "--moves", LONG),
         "too long; use a shorter name"),
    Case("outputs-simulate-over-plan", (*SIMULATE, "-o", "plan-0.json"), "is also an input"),
    Case("outputs-simulate-over-trace", (*SIMULATE, "-o", "trace.parquet"), "is also an input"),
    Case("outputs-simulate-into-folder", (*SIMULATE, "-o", "model"), "is a folder"),
    Case("outputs-export-over-plan", ("export", "--plan", "plan-0.json", "--format", "sglang", "-o", "plan-0.json"),
         "is also an input"),
    Case("outputs-export-over-tables", ("export", "--plan", "plan-0.json", "--format", "eplb", "--tables",
                                        "tables-0.npz", "-o", "tables-0.npz"), "is also an input"),
    Case("outputs-export-into-folder", ("export", "--plan", "plan-0.json", "--format", "sglang", "-o", "."),
         "is a folder"),
    Case("outputs-export-trtllm-over-plan", ("export", "--plan", "plan-0.json", "--format", "trtllm", "-o",
                                             "plan-0.json"), "is also an input"),
    Case("outputs-export-vllm-ascend-under-a-file", ("export", "--plan", "plan-0.json", "--format", "vllm-ascend",
                                                     "-o", "plan-1.json/map.json"), "is a file"),
    Case("outputs-export-over-memory", ("export", "--plan", "plan-0.json", "--format", "sglang", "-o", "out.json",
                                        "--cluster", "cluster.toml"), "KiB over"),
    Case("outputs-report-over-plan", ("report", "--plan", "plan-0.json", "-o", "plan-0.json"), "is also an input"),
    Case("outputs-report-over-tables", ("report", "--plan", "plan-0.json", "--tables", "tables-0.npz", "-o",
                                        "tables-0.npz"), "is also an input"),
    Case("outputs-report-png-is-a-file", ("report", "--plan", "plan-0.json", "-o", "r.html", "--png", "plan-1.json"),
         "is a file"),
    Case("outputs-report-png-under-a-file", ("report", "--plan", "plan-0.json", "-o", "r.html", "--png",
                                             "plan-1.json/png"), "is a file"),
    Case("outputs-report-into-folder", ("report", "--plan", "plan-0.json", "-o", "model"), "is a folder"),
    Case("outputs-tables-over-trace", ("profile", "tables", "trace.parquet", "-o", "trace.parquet"),
         "is also an input"),
    Case("outputs-tables-into-folder", ("profile", "tables", "trace.parquet", "-o", "model"), "is a folder"),
    Case("outputs-windows-over-trace", ("profile", "tables", "trace.parquet", "--window", "5", "-o",
                                        "trace.parquet"), "is also an input"),
    Case("outputs-windows-into-a-file", ("profile", "tables", "trace.parquet", "--window", "5", "-o",
                                         "plan-0.json"), "is a file"),
    Case("outputs-windows-into-a-folder-of-other-files", ("profile", "tables", "trace.parquet", "--window", "5",
                                                          "-o", "model"), "did not write"),
    Case("outputs-windows-into-a-folder-with-another-programs-manifest", ("profile", "tables", "trace.parquet",
                                                                         "--window", "5", "-o", "app"),
         "did not write", writes("app/manifest.json", '{"name": "my-app"}')),
    Case("outputs-windows-into-a-window-set-with-a-stray-file", ("profile", "tables", "trace.parquet", "--window",
                                                                 "5", "-o", "win"), "did not write",
         writes("win/manifest.json", '{"format": "prism-plan/windows", "windows": ["window-0000.npz"]}')),
    Case("outputs-windows-into-a-folder-with-a-stray-file", ("profile", "tables", "trace.parquet", "--window",
                                                             "5", "-o", "win"), "did not write",
         folder("win", "notes.txt")),
    Case("outputs-windows-replacing-the-folder-of-the-trace", ("profile", "tables", "win/trace.parquet", "--window",
                                                               "5", "-o", "win"), "holds the input",
         window_set_holding_the_trace),
    Case("outputs-drift-over-trace", ("profile", "drift", "trace.parquet", "-o", "trace.parquet"), "is also an input"),
    Case("outputs-drift-into-folder", ("profile", "drift", "trace.parquet", "-o", "model"), "is a folder"),
    Case("outputs-import-over-source", ("profile", "import", "--format", "jsonl", "prompts.jsonl", "--model",
                                        "model", "-o", "prompts.jsonl"), "is also an input"),
    Case("outputs-import-over-model-config", ("profile", "import", "--format", "jsonl", "prompts.jsonl", "--model",
                                              "model/config.json", "-o", "model/config.json"), "is also an input"),
    Case("outputs-run-over-prompts", ("profile", "run", "model", "--prompts", "prompts.jsonl", "-o",
                                      "prompts.jsonl"), "is also an input"),
    Case("outputs-solve-over-the-model-config", (*SOLVE, "--model", "model", "-o", "model/config.json"),
         "is a file of the input folder"),
    Case("outputs-run-over-the-checkpoint", ("profile", "run", "model", "--prompts", "prompts.jsonl", "-o",
                                             "model/model.safetensors"), "is a file of the input folder"),
    Case("outputs-import-over-a-file-of-the-source-folder", ("profile", "import", "--format", "vllm", "src",
                                                              "--model", "model", "-o", "src/r.npy"),
         "is a file of the input folder", folder("src", "r.npy")),
    Case("outputs-quickstart-into-a-file", ("quickstart", "-o", "plan-0.json"), "is a file"),
    Case("outputs-quickstart-tables-is-a-folder", ("quickstart", "-o", "qs"), "qs/tables.npz is a folder",
         folder("qs/tables.npz")),
    Case("outputs-quickstart-where-no-folder-can-be", ("quickstart", "-o", "/proc/prism-plan-qs"),
         "cannot write /proc/prism-plan-qs"),
    Case("outputs-solve-where-no-folder-can-be", (*SOLVE, "-o", "/proc/prism-plan/plan.json"), "cannot write"),
    Case("outputs-quickstart-name-too-long", ("quickstart", "-o", LONG), "too long; use a shorter name"),
]
