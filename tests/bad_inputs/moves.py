"""Bad moves files, plans and checkpoints given to `apply`: each is refused while the inputs are read, before any
rank would start (so these run in-process, without torchrun, and must not end in its how-to-start line)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from bad_inputs import Case, writes
from prism_plan.placement.migration import content_sha256

APPLY = ("apply", "--plan", "plan-1.json", "--moves", "moves-1.json", "--cluster", "cluster.toml")


def moved(change: Callable[[dict], None], *, seal: bool = True) -> Callable[[Path], None]:
    """A setup that rewrites the bundled moves-1.json with `change` applied to its JSON and, with `seal`, its
    content_sha256 recomputed, as a careful forger would: the checks behind the seal must catch the edit."""
    def setup(d: Path) -> None:
        path = d / "moves-1.json"
        doc = json.loads(path.read_text())
        change(doc)
        if seal and isinstance(doc, dict) and "content_sha256" in doc:
            doc["content_sha256"] = content_sha256(doc)
        path.write_text(json.dumps(doc, indent=1))
    return setup


def step(kind: str, **values) -> Callable[[dict], None]:
    """A change that sets `values` in the first step doing `kind` ("copy" or "evict")."""
    def change(doc: dict) -> None:
        first = next(s for st in doc["stages"] for s in st["steps"] if s["op"] == kind)
        first.update(values)
    return change


def drop(key: str) -> Callable[[dict], None]:
    return lambda doc: doc.pop(key)


def put(**values) -> Callable[[dict], None]:
    return lambda doc: doc.update(values)


def other_expert(doc: dict) -> None:
    """The edit of the issue: one copy's expert id changed (to another id of the model)."""
    first = next(s for st in doc["stages"] for s in st["steps"] if s["op"] == "copy")
    first["expert"] = (first["expert"] + 1) % doc["model"]["num_experts"]


def flip_hash(key: str) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        h = doc[key]
        doc[key] = ("1" if h[0] == "0" else "0") + h[1:]
    return change


def copy_from_its_destination(doc: dict) -> None:
    """A copy whose source is changed to its destination: the placements still agree, the step cannot run."""
    first = next(s for st in doc["stages"] for s in st["steps"] if s["op"] == "copy")
    first["src"] = first["dst"]


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        path = d / name
        path.write_bytes(path.read_bytes()[:keep])
    return setup


def double_rows(source: str, name: str) -> Callable[[Path], None]:
    """A copy of the checkpoint folder `source` as `name` whose expert tensors have twice the rows."""
    def setup(d: Path) -> None:
        import torch  # when the case runs: collecting the table stays quick
        from safetensors.torch import load_file, save_file

        shutil.copytree(d / source, d / name)
        tensors = load_file(d / name / "model.safetensors")
        save_file({k: torch.cat([t, t]) if ".experts." in k else t for k, t in tensors.items()},
                  d / name / "model.safetensors")
    return setup


def first_stage(change: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda doc: change(doc["stages"][0])


CASES = [
    Case("moves-not-json", APPLY, "not valid JSON", writes("moves-1.json", "{not json")),
    Case("moves-empty-file", APPLY, "not valid JSON", writes("moves-1.json", "")),
    Case("moves-not-utf8", APPLY, "moves-1.json", writes("moves-1.json", b"\xff\xfe{\x00")),
    Case("moves-a-json-list", APPLY, "not a prism-plan moves file", writes("moves-1.json", "[]")),
    Case("moves-a-plan-file", ("apply", "--plan", "plan-1.json", "--moves", "plan-0.json", "--cluster",
                               "cluster.toml"), "not a prism-plan moves file"),
    Case("moves-version-1", APPLY, "re-create it with `prism-plan migrate`", moved(put(version=1))),
    Case("moves-version-3", APPLY, "version 3", moved(put(version=3))),
    Case("moves-no-stages", APPLY, 'has no "stages"', moved(drop("stages"))),
    Case("moves-stages-not-a-list", APPLY, '"stages" must be a list', moved(put(stages={}))),
    Case("moves-step-not-an-object", APPLY, "must be a JSON object",
         moved(first_stage(lambda st: st.update(steps=[5])))),
    Case("moves-step-unknown-op", APPLY, '"op" must be "evict" or "copy"', moved(step("copy", op="move"))),
    Case("moves-step-without-src", APPLY, 'has no "src"', moved(lambda doc: next(
        s for st in doc["stages"] for s in st["steps"] if s["op"] == "copy").pop("src"))),
    Case("moves-step-unknown-layer", APPLY, "must be one of the model's MoE layers", moved(step("copy", layer=7))),
    Case("moves-step-layer-string", APPLY, "must be one of the model's MoE layers", moved(step("evict", layer="0"))),
    Case("moves-step-expert-too-big", APPLY, "from 0 to 5", moved(step("copy", expert=6))),
    Case("moves-step-expert-negative", APPLY, "from 0 to 5", moved(step("copy", expert=-1))),
    Case("moves-step-expert-string", APPLY, "must be an integer", moved(step("copy", expert="3"))),
    Case("moves-step-expert-float", APPLY, "must be an integer", moved(step("evict", expert=3.0))),
    Case("moves-step-expert-bool", APPLY, "must be an integer", moved(step("copy", expert=True))),
    Case("moves-step-expert-changed", APPLY, "do not start where they say", moved(other_expert)),
    Case("moves-step-unknown-server", APPLY, '"dst" must be one of the servers', moved(step("copy", dst="s9"))),
    Case("moves-step-server-not-a-name", APPLY, '"server" must be one of the servers',
         moved(step("evict", server=0))),
    Case("moves-step-wrong-bytes", APPLY, '"bytes" is 1000', moved(step("copy", bytes=1000))),
    Case("moves-step-temporary-string", APPLY, '"temporary" must be true or false',
         moved(step("copy", temporary="yes"))),
    Case("moves-copy-from-its-destination", APPLY, "which does not hold it", moved(copy_from_its_destination)),
    Case("moves-stage-seconds-nan", APPLY, "finite number",
         moved(first_stage(lambda st: st.update(seconds=float("nan"))))),
    Case("moves-stage-seconds-negative", APPLY, "at least 0",
         moved(first_stage(lambda st: st.update(seconds=-1.0)))),
    Case("moves-min-replicas-zero", APPLY, "min_replicas", moved(put(min_replicas=0))),
    Case("moves-min-replicas-bool", APPLY, "min_replicas", moved(put(min_replicas=True))),
    Case("moves-total-bytes-edited", APPLY, "but its steps make",
         moved(lambda doc: doc.update(bytes=doc["bytes"] + 1))),
    Case("moves-copies-count-edited", APPLY, '"copies" is 3 but', moved(put(copies=3))),
    Case("moves-lower-bound-above-bytes", APPLY, '"lower_bound_bytes"',
         moved(lambda doc: doc.update(lower_bound_bytes=doc["bytes"] + 1))),
    Case("moves-from-placement-edited", APPLY, "do not start where they say",
         moved(flip_hash("from_placement_sha256"))),
    Case("moves-from-placement-garbage", APPLY, "must be a sha256", moved(put(from_placement_sha256="xyz"))),
    Case("moves-from-placement-blank", APPLY, "do not record the placements", moved(put(from_placement_sha256=""))),
    Case("moves-to-plan-edited", APPLY, "lead to another plan", moved(flip_hash("to_plan_sha256"))),
    Case("moves-to-placement-edited", APPLY, "lead to another plan", moved(flip_hash("to_placement_sha256"))),
    Case("moves-given-the-old-plan", ("apply", "--plan", "plan-0.json", "--moves", "moves-1.json", "--cluster",
                                      "cluster.toml"), "lead to another plan"),
    Case("moves-servers-renamed", APPLY, "must be one of the servers", moved(put(servers=["s0", "s9"]))),
    Case("moves-servers-repeat", APPLY, "distinct server names", moved(put(servers=["s0", "s0"]))),
    Case("moves-model-of-another-size", APPLY, "are for model",
         moved(lambda doc: doc["model"].update(num_experts=7))),
    Case("moves-model-unknown-key", APPLY, "unknown keys", moved(lambda doc: doc["model"].update(colour="red"))),
    Case("moves-checkpoint-truncated", APPLY + ("--checkpoint", "model"), "not a readable safetensors file",
         truncate("model/model.safetensors", 5000)),
    Case("moves-checkpoint-missing", APPLY + ("--checkpoint", "nowhere"), "no checkpoint folder"),
    Case("moves-checkpoint-a-file", APPLY + ("--checkpoint", "plan-1.json"), "is a file"),
    *(Case(f"moves-unsealed-edit-of-{name}", APPLY, "was edited after `prism-plan migrate` wrote it",
           moved(change, seal=False)) for name, change in (
        ("from-plan-sha256", flip_hash("from_plan_sha256")), ("an-expert-id", other_expert),
        ("stage-seconds", first_stage(lambda st: st.update(seconds=st["seconds"] * 2))))),
    Case("moves-checkpoint-of-another-size", APPLY + ("--checkpoint", "big"),
         "pass the checkpoint of the plan's model", double_rows("model", "big")),
    Case("moves-checkpoint-empty-folder", APPLY + ("--checkpoint", "empty"), "holds no .safetensors",
         lambda d: (d / "empty").mkdir()),
]
