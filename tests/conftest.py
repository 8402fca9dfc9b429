import os
from pathlib import Path

import pytest

from prism_plan.studies.bundled import BUNDLED_CLUSTER, BUNDLED_TRACE
from prism_plan.placement.cluster import load_cluster
from prism_plan.placement.model import resolve_model
from prism_plan.traces.tables import tables_from_trace

SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
# The ESFT expert scores the bundled trace was made from: the project's shared folder, or any copy of
# github.com/deepseek-ai/ESFT's results/expert_scores named by PRISM_ESFT (README, "Data").
ESFT = Path(os.environ.get("PRISM_ESFT", SHARED_TRACES / "esft-deepseek-v2-lite"))


@pytest.fixture(scope="session")
def esft_dir() -> Path:
    if not ESFT.is_dir():
        pytest.skip(f"the ESFT expert scores are not at {ESFT}; set PRISM_ESFT to a clone's "
                    "results/expert_scores (README, Data)")
    return ESFT


@pytest.fixture(scope="session")
def dsv2():
    return resolve_model("deepseek-v2-lite")


@pytest.fixture(scope="session")
def esft_tables():
    return tables_from_trace(BUNDLED_TRACE)


@pytest.fixture(scope="session")
def edge4():
    return load_cluster(BUNDLED_CLUSTER)
