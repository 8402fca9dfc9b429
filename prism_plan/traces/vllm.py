"""Importer for vLLM's routed experts (`--enable-return-routed-experts`): per request, the logical experts each
token was routed to, `[tokens, num_hidden_layers, top_k]` (uint8, uint16 or int32; rows of dense layers are zero).
An array `[tokens, moe_layers, top_k]` (the model's MoE layers only, in order) is read too.

SRC is one file or a folder of them:
- `.npy` (one request), `.npz` (one request per array, in key order), `.pt` (a tensor, a list or a dict of them,
  one request each): `CompletionOutput.routed_experts` saved with numpy or torch;
- `.json` (one response or a list of them) or `.jsonl` (one response per line): what vLLM's OpenAI server returns
  (`/v1/completions`, `/v1/chat/completions`, the tokens-in-tokens-out `generate` endpoint), whose
  `choices[i].routed_experts` is a base64 `.npy` string; or `LLM.generate`'s RequestOutputs dumped to JSON
  (`outputs` for `choices`; `routed_experts` base64 `.npy` or nested lists). Each choice is one request; one
  without `routed_experts` (aborted before its first forward pass) is skipped.

vLLM returns the routing of every token it ran through the model: the prompt from `routed_experts_prompt_start`
(0 unless the request set it) and the generated tokens but the last. Knowing a request's P prompt tokens (its
`prompt_token_ids`, returned with `"return_token_ids": true`, or `prompt_tokens`), tokens before P are prefill and
the rest decode; knowing its generated `token_ids` too, the rows of a skipped prompt prefix are told from the row
count. Position = the token's index in the request. Without P every token is prefill at its row. The origin is
--origin, else each file's name; requests are numbered per origin in file order.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import read_user_json
from prism_plan.placement.checks import integer
from prism_plan.placement.model import ModelSpec
from prism_plan.traces.dumps import (JsonLine, dump_files, json_ints, json_lines, load_torch_file, npy_bytes,
                                     read_npy, read_npz)
from prism_plan.traces.trace import Trace, TraceMeta, routing_ids

PATTERNS = ("*.npy", "*.npz", "*.pt", "*.json", "*.jsonl")
RESPONSE_FIX = "save the server's JSON response (with --enable-return-routed-experts) as it came"


class Request(NamedTuple):
    """One request of a source: where it is, its routed experts, and its prompt and generated token counts
    (None: not known)."""

    where: str
    routed: object
    prompt: int | None = None
    generated: int | None = None


def _array_requests(path: Path) -> list[Request]:
    """The requests of a numpy or torch file."""
    fix = "save the routed experts with numpy (np.save, np.savez) or torch.save"
    if path.suffix == ".npy":
        return [Request(f"{path}", read_npy(path, ".npy array file", fix))]
    if path.suffix == ".npz":
        items = read_npz(path, ".npz archive of arrays", fix).items()
    else:
        obj = load_torch_file(path)
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else [(0, obj)]
    return [Request(f"{path} request {label}", arr) for label, arr in items]


def _responses(path: Path) -> Iterator[tuple[str, object, str]]:
    """(where, response, its JSON text) of each response in a `.json` or `.jsonl` file."""
    if path.suffix == ".jsonl":
        yield from json_lines(path, "vLLM responses")
        return
    value = read_user_json(path, "vLLM response file")
    # the file's text is not at hand: "true" lets json_ints look for bools in nested lists itself
    if isinstance(value, list):
        yield from ((f"{path} response {i}", v, "true") for i, v in enumerate(value))
    else:
        yield f"{path}", value, "true"


def _count(value: object, name: str, where: str) -> int | None:
    """The length of a list of token ids in a response (None when it is absent or null)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise PrismError(f"{where}: `{name}` must be a list of token ids, got {type(value).__name__}; "
                         f"{RESPONSE_FIX}")
    return len(value)


def _routed(value: object, where: str, text: str) -> np.ndarray:
    """A choice's routed_experts: base64 `.npy` (as vLLM's numpy2base64 writes it) or nested lists."""
    if isinstance(value, list):
        return json_ints(value, "routed_experts", JsonLine(where, value, text))
    if not isinstance(value, str):
        raise PrismError(f"{where}: `routed_experts` must be a base64 .npy string, got {type(value).__name__}; "
                         f"{RESPONSE_FIX}")
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise PrismError(f"{where}: `routed_experts` is not base64; {RESPONSE_FIX}")
    return npy_bytes(data, f"{where}: `routed_experts`", RESPONSE_FIX)


def _response_requests(path: Path) -> list[Request]:
    """The requests of a `.json` or `.jsonl` file of saved responses: one per choice with routed experts."""
    out = []
    for where, response, text in _responses(path):
        choices = response.get("choices", response.get("outputs")) if isinstance(response, dict) else None
        if not isinstance(choices, list):
            raise PrismError(f"{where}: not a vLLM response (no list of `choices` or `outputs`); {RESPONSE_FIX}")
        prompt = _count(response.get("prompt_token_ids"), "prompt_token_ids", where)
        for i, choice in enumerate(choices):
            at = f"{where} choice {i}"
            if not isinstance(choice, dict):
                raise PrismError(f"{at}: a choice must be an object, got {type(choice).__name__}; {RESPONSE_FIX}")
            if choice.get("routed_experts") is None:
                continue
            own = _count(choice.get("prompt_token_ids"), "prompt_token_ids", at)  # completions: per choice
            out.append(Request(at, _routed(choice["routed_experts"], at, text), prompt if own is None else own,
                               _count(choice.get("token_ids"), "token_ids", at)))
    if not out:
        raise PrismError(f"{path}: no choice holds `routed_experts`; start vLLM with --enable-return-routed-experts")
    return out


def _moe_layers(arr: object, model: ModelSpec, where: str) -> np.ndarray:
    """The model's MoE layers [tokens, moe_layers, top_k] of a request's routed experts, all hidden layers or MoE
    layers only, once the rows of dense layers are zero."""
    h, m, k = model.num_hidden_layers, model.num_layers, model.top_k
    forms = f"[tokens, {h}, {k}] (all hidden layers, as vLLM returns them)"
    if m != h:
        forms += f" or [tokens, {m}, {k}] (MoE layers only)"
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise PrismError(f"{where}: expected an integer array {forms}, got {got}")
    if arr.ndim != 3 or arr.shape[2] != k or arr.shape[1] not in (h, m):
        raise PrismError(f"{where}: routed experts have shape {list(arr.shape)}, model {model.name!r} needs {forms}; "
                         f"pass the right `model`", parameters=("model",))
    if arr.shape[1] == m:
        return arr
    dense = np.setdiff1d(np.arange(h), model.layers)
    used = arr[:, dense].any(axis=(0, 2))
    if used.any():
        raise PrismError(f"{where}: layer {dense[used][0]} has expert ids, but it is not one of model {model.name!r}'s "
                         f"MoE layers (vLLM leaves the rows of dense layers zero); pass the right `model`",
                         parameters=("model",))
    return arr[:, list(model.layers)]


def _tokens(request: Request, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(position [n] int32, decode [n] bool) of a request's n rows."""
    p, g = request.prompt, request.generated
    if p is None:
        return np.arange(n, dtype=np.int32), np.zeros(n, bool)
    start = 0 if g is None else p + g - 1 - n  # the prompt tokens routed_experts_prompt_start skipped
    if not 0 <= start <= p:
        raise PrismError(f"{request.where}: {n} rows of routed experts for {p} prompt and {g} generated tokens; "
                         f"vLLM returns at most one row per token but the last: give the request's own response")
    position = np.arange(start, start + n, dtype=np.int32)
    return position, position >= p


def iter_vllm(src: str | Path, model: ModelSpec, origin: str | None = None, *,
              prompt_tokens: int | None = None) -> Iterator[Trace]:
    """Yield one Trace per request. prompt_tokens: the number of prompt tokens of every request whose source
    does not list its `prompt_token_ids` (plain arrays); None: not known, every token is prefill."""
    if prompt_tokens is not None:
        integer(prompt_tokens, "`prompt_tokens`", low=0, parameters=("prompt_tokens",))
    meta = TraceMeta.for_model(model, source=f"vllm:{Path(src).name}")
    names: list[str] = []
    next_request: dict[str, int] = {}
    for path in dump_files(Path(src), PATTERNS):
        name = origin or path.stem
        if name not in names:
            names.append(name)
        saved = path.suffix in (".json", ".jsonl")
        for request in _response_requests(path) if saved else _array_requests(path):
            if request.prompt is None:
                request = request._replace(prompt=prompt_tokens)
            elif prompt_tokens not in (None, request.prompt):
                raise PrismError(f"{request.where}: the response lists {request.prompt} prompt tokens, but "
                                 f"prompt_tokens={prompt_tokens}; leave `prompt_tokens` out for saved responses",
                                 parameters=("prompt_tokens",))
            arr = _moe_layers(request.routed, model, request.where)
            experts = routing_ids(arr, model.num_experts, request.where, "pass the right `model`",
                                  rows=lambda t: f" token {t}", parameters=("model",))
            n = len(arr)
            position, decode = _tokens(request, n)
            number = next_request.get(name, 0)
            next_request[name] = number + 1
            yield Trace(meta, tuple(names), np.full(n, names.index(name), np.int32), np.full(n, number, np.int64),
                        position, decode, experts)
