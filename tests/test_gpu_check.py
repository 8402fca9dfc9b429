"""bench/gpu_check.py's cheapest checks on CPU: the expert store and the distributed forward are ok there, and
their CUDA parts say they were skipped when no GPU is counted."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_store_and_forward_checks_pass_on_cpu_and_skip_cuda_without_a_gpu(tmp_path):
    gpu_check = load_script()
    ctx = gpu_check.Context(tmp_path, gpus=0)
    rows = gpu_check.check_store(ctx) + gpu_check.check_forward(ctx)
    assert [(r.device, r.result) for r in rows] == [("cpu", "ok"), ("cuda", "skipped (no CUDA GPU)")] * 2, rows
    assert "18 experts" in rows[0].detail and "max |moe - model experts|" in rows[2].detail


def test_a_failing_part_is_one_failed_row():
    gpu_check = load_script()
    row = gpu_check.measured("x", "cpu", lambda: 1 / 0)
    assert (row.result, row.detail) == ("FAILED", "ZeroDivisionError: division by zero")
    assert "FAILED" in gpu_check.table([row])
