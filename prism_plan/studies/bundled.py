"""The bundled real data: DeepSeek-V2-Lite routing on four ESFT domains and a 4-server edge cluster."""

from __future__ import annotations

from prism_plan.fileio import DATA_DIR

BUNDLED_TRACE = DATA_DIR / "esft-deepseek-v2-lite.parquet"
BUNDLED_CLUSTER = DATA_DIR / "edge-4.toml"
BUNDLED_MODEL = "deepseek-v2-lite"
