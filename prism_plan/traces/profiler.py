"""Record a Hugging Face MoE model's own routing: every token's top-k experts and gate weights at every MoE
layer, for prefill and greedy decode steps, through forward hooks on the router modules, streamed to Parquet.

A MoE block is a module with an `experts` child and a `gate` or `router` child; its layer number is the
`layers.<i>` in its name (dense layers have no such block and are skipped). What a router returns decides
what is read, never recomputed where the router says it:
- transformers 5.x, every family: (logits, weights [tokens, k], indices [tokens, k]), recorded as they are,
  DeepSeek-V3's score bias and group limit included;
- transformers 4.x DeepSeek-V3: (indices, weights); GPT-OSS: (scores [tokens, experts], indices);
- transformers 4.x Mixtral, Qwen2/3-MoE, OLMoE (a plain linear gate): logits, from which the block takes
  softmax then top-k (weights renormalised for Mixtral and where norm_topk_prob says), repeated here;
  Phi-MoE 4.x: logits, through the model's own sparsemixer.
Prompts are batched with left padding; padded positions are never recorded.

Where the model runs (`choose_runtime`): on the CPU or a CUDA GPU, in float32, bfloat16 or float16 (default:
float32 on the CPU, where bfloat16 halves the memory but runs no faster, see bench/profile_speed.py; bfloat16 on
a GPU, float16 on GPUs without it), on one device or spread by accelerate over every GPU and CPU memory
(`device_map="auto"`, chosen by itself when the weights do not fit the GPU). Before loading, the weights' size
(parameters counted on the meta device x the dtype's bytes) is held against the memory free, so a model that
cannot fit is refused in one line instead of being killed by the OS. Each batch runs in forward passes of at
most `max_batch_tokens` tokens; a pass that runs out of memory is halved and run again, and the batch's rows are
written only once all of it has run, in the same order as an unsplit batch, so a retry never writes a row twice.

Needs the `profile` extra (torch, transformers; accelerate for `device_map="auto"`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from prism_plan.errors import MissingInputError, PrismError
from prism_plan.placement.checks import integer, text
from prism_plan.placement.model import from_hf_config
from prism_plan.progress import counter, spinner
from prism_plan.traces.dumps import json_ints, json_lines, reason
from prism_plan.traces.trace import Trace, TraceMeta, TraceWriter
from prism_plan.units import count, human_bytes

INSTALL = "pip install 'prism-plan[profile]'  (torch==2.13.0 and transformers)"


def _require_torch():
    try:
        import torch
        importlib.import_module("transformers")
    except ImportError as e:
        raise PrismError(f"profiling real models needs torch and transformers ({e.name} is missing): {INSTALL}")
    return torch


@dataclass(frozen=True)
class Prompt:
    """One request to profile: its origin and its token ids."""

    origin: str
    ids: tuple[int, ...]


def read_prompts(path: str | Path, tokenizer=None, *, origin_field: str = "origin",
                 chat_template: bool = False) -> list[Prompt]:
    """Prompts from JSONL: each line has the origin field (a string) and either `input_ids` (a list of
    integers) or `text` (a string, tokenised with `tokenizer`, through its chat template when asked)."""
    path = Path(path)
    prompts = []
    for line in json_lines(path, "prompts file"):
        where, d, _ = line
        if not isinstance(d, dict) or origin_field not in d:
            raise PrismError(f"{where}: each line needs a `{origin_field}` (`origin_field`) and `text` or `input_ids`",
                             parameters=("origin_field",))
        origin = text(d[origin_field], f"{where}: `{origin_field}`", fix="name each prompt's origin")
        if "input_ids" in d:
            ids = json_ints(d["input_ids"], "input_ids", line)
            if ids.ndim != 1 or not ids.size or ids.min() < 0:
                raise PrismError(f"{where}: `input_ids` must be a non-empty list of token ids (integers >= 0)")
            ids = ids.tolist()
        elif "text" in d:
            prompt = text(d["text"], f"{where}: `text`", fix="give the prompt as a string")
            if tokenizer is None:
                raise PrismError(f"{where}: `text` needs the model's tokenizer, which the model folder lacks or which "
                                 f"could not be loaded; give `input_ids` instead")
            if chat_template:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = tokenizer(prompt)["input_ids"]
            if not ids:
                raise PrismError(f"{where}: `text` has no tokens")
        else:
            raise PrismError(f"{where}: give `text` or `input_ids`")
        prompts.append(Prompt(origin, tuple(int(i) for i in ids)))
    if not prompts:
        raise PrismError(f"{path} holds no prompts")
    return prompts


def moe_routers(model) -> list[tuple[int, object]]:
    """[(layer number, router module)] of every MoE block, in layer order."""
    found = {}
    for name, module in model.named_modules():
        if not hasattr(module, "experts"):
            continue
        router = getattr(module, "gate", None)
        router = getattr(module, "router", None) if router is None else router
        m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
        if router is not None and m and callable(router):
            found.setdefault(int(m.group(1)), router)
    return sorted(found.items())


def router_choice(output, top_k: int, family: str = "", config=None):
    """(indices [tokens, k] int64, weights [tokens, k] float32) from what a router returned (module docstring)."""
    torch = _require_torch()
    if isinstance(output, (tuple, list)):
        ints = [t for t in output if torch.is_tensor(t) and not t.is_floating_point()]
        floats = [t for t in output if torch.is_tensor(t) and t.is_floating_point()]
        if not ints:
            raise PrismError(f"a {family or 'model'} router returned no expert indices; this model's routing is "
                             f"not supported yet")
        ids = ints[-1].reshape(-1, ints[-1].shape[-1])
        same = [f for f in floats if f.shape[-1] == ids.shape[-1]]
        if same:
            weights = same[-1].reshape(ids.shape)
        else:
            scores = floats[-1].reshape(ids.shape[0], -1)
            weights = scores.gather(1, ids)
        return ids.long(), weights.float()
    logits = output.reshape(-1, output.shape[-1]).float()
    if family == "phimoe":
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        weights, ids = sparsemixer(logits, jitter_eps=getattr(config, "router_jitter_noise", 0.01), training=False)
        return ids.long(), weights.float()
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if family == "mixtral" or getattr(config, "norm_topk_prob", False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids.long(), weights.float()


class RoutingRecorder:
    """Forward hooks on every router; `take()` returns what the last forward pass chose."""

    def __init__(self, model, top_k: int) -> None:
        self.routers = moe_routers(model)
        if not self.routers:
            raise PrismError(f"found no MoE blocks (a module with `experts` and a `gate` or `router`) in "
                             f"{type(model).__name__}; this model family is not supported yet")
        self.layers = tuple(layer for layer, _ in self.routers)
        family = str(getattr(model.config, "model_type", ""))
        self._seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._handles = []
        for layer, router in self.routers:
            def hook(module, args, output, layer=layer):
                ids, w = router_choice(output, top_k, family, model.config)
                self._seen[layer] = (ids.cpu().numpy(), w.cpu().numpy())
            self._handles.append(router.register_forward_hook(hook))

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(experts [tokens, layers, k] int16, weights [tokens, layers, k] float32) of the last forward."""
        missing = [x for x in self.layers if x not in self._seen]
        if missing:
            raise PrismError(f"MoE layers {missing} did not route in the last forward pass")
        ids = np.stack([self._seen[x][0] for x in self.layers], axis=1).astype(np.int16)
        w = np.stack([self._seen[x][1] for x in self.layers], axis=1).astype(np.float32)
        self._seen.clear()
        return ids, w

    def clear(self) -> None:
        """Forget what a forward pass that failed part-way routed."""
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("bfloat16", "float16", "float32")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEVICE_MAPS = ("auto",)
MAX_BATCH_TOKENS = 8192
# The weights may take this share of a GPU's free memory; the rest holds activations and the KV cache.
GPU_WEIGHT_SHARE = 0.9


@dataclass(frozen=True)
class Runtime:
    """Where a model runs: `device` "cpu" or "cuda" (the current GPU), `dtype` one of DTYPES, `device_map` None
    (the whole model on `device`) or "auto" (accelerate spreads it over every GPU, then CPU memory)."""

    device: str
    dtype: str
    device_map: str | None = None

    def __str__(self) -> str:
        return f"{self.device}, {self.dtype}" + (", device_map auto" if self.device_map else "")


def choose_runtime(*, device: str = "auto", dtype: str | None = None, device_map: str | None = None) -> Runtime:
    """Check and resolve where a model runs. device: auto (cuda when torch sees a GPU, else cpu), cpu or cuda;
    dtype: one of DTYPES, or None for float32 on cpu, bfloat16 on a GPU that computes it natively, else float16;
    device_map: None or "auto" (needs cuda and accelerate). Refuses what this torch cannot do here."""
    torch = _require_torch()
    for value, name, allowed in ((device, "device", DEVICES), (dtype, "dtype", DTYPES),
                                 (device_map, "device_map", DEVICE_MAPS)):
        if value not in allowed and (name == "device" or value is not None):
            raise PrismError(f"unknown `{name}` {value!r}; choose one of {', '.join(allowed)}", parameters=(name,))
    gpu = torch.cuda.is_available()
    if device == "cuda" and not gpu:
        why = "this torch is built for the CPU only" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise PrismError(f"`device` is cuda, but {why} (torch {torch.__version__}); use cpu, or auto to take a GPU "
                         f"when there is one", parameters=("device",))
    chosen = "cuda" if device == "cuda" or (device == "auto" and gpu) else "cpu"
    if device_map is not None:
        if chosen != "cuda":
            raise PrismError("`device_map` auto spreads a model over GPUs and CPU memory, so it needs a GPU: "
                             "`device` cuda, or auto on a machine with one", parameters=("device_map", "device"))
        _require_accelerate()
    if dtype is None:
        dtype = "float32" if chosen == "cpu" else "bfloat16" if _native_bf16(torch) else "float16"
    _check_dtype(torch, chosen, dtype)
    return Runtime(chosen, dtype, device_map)


def _native_bf16(torch) -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def _check_dtype(torch, device: str, dtype: str) -> None:
    """Refuse a dtype the device cannot compute in: GPUs before Ampere only emulate bfloat16, and a torch build
    may lack a CPU kernel for it or for float16."""
    if device == "cuda" and dtype == "bfloat16" and not _native_bf16(torch):
        raise PrismError(f"this GPU ({torch.cuda.get_device_name()}) does not compute in bfloat16; use `dtype` "
                         f"float16 or float32", parameters=("dtype",))
    try:
        x = torch.ones((8, 8), dtype=getattr(torch, dtype), device=device)
        torch.softmax(torch.matmul(x, x), dim=-1)
    except RuntimeError as e:
        raise PrismError(f"torch {torch.__version__} cannot compute in {dtype} on this {device.upper()} "
                         f"({reason(e)}); use `dtype` float32", parameters=("dtype",)) from None


def _require_accelerate() -> None:
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise PrismError("`device_map` auto needs accelerate, which is not installed: pip install accelerate",
                         parameters=("device_map",))


def free_memory(device: str) -> int | None:
    """Bytes a model may still take on `device` ("cpu" or "cuda"): the current GPU's free memory, or the memory
    (RAM and swap) the OS can still give; None where the OS does not say."""
    torch = _require_torch()
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        if "MemAvailable" in info:
            return 1024 * sum(int(info[k].split()[0]) for k in ("MemAvailable", "SwapFree") if k in info)
    except (OSError, ValueError):
        pass
    try:  # elsewhere (macOS) only the physical memory is known: the most a model could take
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def parameter_count(config, trust_remote_code: bool = False) -> int:
    """Parameters of the causal LM a transformers `config` describes, counted on the meta device (no memory)."""
    torch = _require_torch()
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def fit_runtime(runtime: Runtime, name: str, params: int, free: int | None, accelerate: bool) -> Runtime:
    """The runtime whose device holds `params` weights of runtime.dtype in `free` bytes: `runtime` itself, or for
    a GPU too small, device_map auto (when `accelerate` is installed); refused when nothing here will hold them."""
    if runtime.device_map is not None or free is None:
        return runtime
    need, half = params * DTYPE_BYTES[runtime.dtype], 2 * params
    what = f"{name} has {count(params)} parameters, {human_bytes(need)} in {runtime.dtype}"
    if runtime.device == "cpu":
        if need <= free:
            return runtime
        fix = (f"in bfloat16 (`dtype`) it needs {human_bytes(half)}, or run it on a GPU (`device` cuda)"
               if half < need and half <= free else "run it on a GPU (`device` cuda) or a machine with more memory")
        raise PrismError(f"{what}, more than the {human_bytes(free)} of memory free here; {fix}",
                         parameters=("dtype", "device"))
    room = GPU_WEIGHT_SHARE * free
    if need <= room:
        return runtime
    if accelerate:
        return replace(runtime, device_map="auto")
    fix = f"in bfloat16 (`dtype`) it needs {human_bytes(half)}; or " if half < need and half <= room else ""
    raise PrismError(f"{what}, more than the GPU's {human_bytes(free)} free holds with room to run; {fix}install "
                     f"accelerate (pip install accelerate), and `device_map` auto spreads it over every GPU and CPU "
                     f"memory", parameters=("dtype", "device_map"))


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' (and torch's) warnings, log messages and loading bars while a model loads and runs:
    deprecations and load reports are advice to model developers, not to the user; errors still raise."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _out_of_memory(error: BaseException) -> bool:
    """True for a GPU's OutOfMemoryError, and for the CPU allocator's failure (where the OS reports it)."""
    torch = _require_torch()
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


# A local folder without one of these has no tokenizer (transformers may still build an empty one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _local_model(path: Path) -> None:
    """Refuse a local path that cannot be a model folder."""
    if not path.is_dir():
        raise PrismError(f"{path} is a file; give a model folder (config.json and weights) or a hub id (org/name)")
    if not (path / "config.json").is_file():
        raise PrismError(f"{path} has no config.json; give a Hugging Face model folder (config.json and weights)")


def _looks_like_path(name: str) -> bool:
    """True for names that a hub id cannot be (hub ids are `name` or `org/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(".json")


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise PrismError(f"`{name}` must be True or False, got {value!r}", parameters=(name,))


def load_model(name_or_path: str | Path, *, device: str = "auto", dtype: str | None = None,
               device_map: str | None = None, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer or None) of a local folder (read offline) or a hub id, placed as
    `choose_runtime(device=, dtype=, device_map=)` says (device_map auto when the weights do not fit the GPU).
    trust_remote_code: run the Python code the model's folder or repository brings (its config's auto_map)."""
    _check_flags(trust_remote_code=trust_remote_code)
    runtime = choose_runtime(device=device, dtype=dtype, device_map=device_map)
    with quiet_transformers():
        model, tokenizer, _ = _load(name_or_path, runtime, trust_remote_code)
    return model, tokenizer


def _load(name_or_path: str | Path, runtime: Runtime, trust_remote_code: bool,
          step: Callable[[str], None] = lambda text: None):
    """(model, tokenizer or None, the runtime it was placed with), naming each step through `step`."""
    torch = _require_torch()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available

    path = Path(name_or_path)
    local = path.exists()
    if local:
        _local_model(path)
    elif _looks_like_path(str(name_or_path)):
        raise MissingInputError(f"no model folder at {name_or_path}; give a local model folder or a hub id "
                                f"(org/name)")
    name, options = str(name_or_path), {"local_files_only": local, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name, **options)
        if runtime.device_map is None:
            step(f"sizing {path.name} for {runtime.device}")
            runtime = fit_runtime(runtime, name, parameter_count(config, trust_remote_code),
                                  free_memory(runtime.device), is_accelerate_available())
        step(f"loading {path.name} ({runtime})")
        placed = {}
        if runtime.device_map is not None:
            placed = {"device_map": runtime.device_map}
        elif runtime.device == "cuda" and is_accelerate_available():  # straight to the GPU, not through CPU memory
            placed = {"device_map": {"": torch.cuda.current_device()}}
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=getattr(torch, runtime.dtype),
                                                     **options, **placed)
        if runtime.device == "cuda" and not placed:
            model.to("cuda")
        tokenizer = None
        if not local or any((path / f).exists() for f in TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(name, **options)
            except Exception:  # a tokenizer is optional: prompts may give input_ids
                tokenizer = None
    except PrismError:
        raise
    except Exception as e:  # transformers, safetensors and torch each raise their own kinds
        raise _load_error(e, name, path, trust_remote_code) from None
    return model.eval(), tokenizer, runtime


def _load_error(e: Exception, name: str, path: Path, trust_remote_code: bool) -> PrismError:
    """The one-line error for a model that would not load."""
    if _out_of_memory(e):
        return PrismError(f"ran out of memory loading {name} ({reason(e)}); use `dtype` bfloat16, `device_map` auto "
                          f"or a machine with more memory", parameters=("dtype", "device_map"))
    if not trust_remote_code and "trust_remote_code" in str(e):
        return PrismError(f"{name} runs Python code of its own (the auto_map of its config.json); read that code, "
                          f"then pass `trust_remote_code` to run it", parameters=("trust_remote_code",))
    if isinstance(e, (OSError, ValueError)):
        return PrismError(f"cannot load model {name}: {reason(e)}; give a complete model folder or a hub id")
    files = sorted(p.name for p in path.glob("*.safetensors")) or sorted(p.name for p in path.glob("*.bin"))
    return PrismError(f"cannot load the weights of {name} ({', '.join(files) or 'none found'}): {reason(e)}; the "
                      f"weights are damaged or incomplete: save or download the model again")


def _batch_trace(meta: TraceMeta, origins: list[str], prompts: list[Prompt], requests: list[int],
                 keep: np.ndarray, positions: np.ndarray, decode: bool, ids: np.ndarray, w: np.ndarray | None):
    """One Trace of the rows of a [batch, seq] forward pass where `keep` ([batch, seq] bool) holds."""
    b, t = keep.shape
    row_of = np.repeat(np.arange(b), t)[keep.ravel()]
    origin = np.array([origins.index(p.origin) for p in prompts], np.int32)[row_of]
    return Trace(meta, tuple(origins), origin, np.asarray(requests, np.int64)[row_of],
                 positions.ravel()[keep.ravel()].astype(np.int32), np.full(len(row_of), decode),
                 ids[keep.ravel()], None if w is None else w[keep.ravel()])


def profile_model(model_name: str | Path, prompts_path: str | Path, out: str | Path, *, origin_field: str = "origin",
                  max_new_tokens: int = 0, batch_size: int = 8, max_batch_tokens: int = MAX_BATCH_TOKENS,
                  chat_template: bool = False, weights: bool = True, device: str = "auto", dtype: str | None = None,
                  device_map: str | None = None, trust_remote_code: bool = False, quiet: bool = False) -> dict:
    """Run the model over the prompts (greedy decoding for `max_new_tokens` steps) and write every token's
    routing to a Parquet trace at `out`, batch by batch.

    batch_size: prompts per batch, which fixes the trace's row order (each batch's prefill rows, then one row
    per prompt and decode step). max_batch_tokens: the most tokens one forward pass holds, counted as prompts x
    (longest prompt + max_new_tokens); a batch above it runs in several passes (a prompt above it, alone), and a
    pass that runs out of memory is halved, neither changing the trace. device, dtype, device_map: where and in
    what precision the model runs (`choose_runtime`; device_map auto is taken when the weights do not fit the
    GPU). trust_remote_code: run the Python code the model brings (off: only transformers' own code runs).
    Returns a summary: path, model, tokens, requests, origins, layers, top_k, decode_steps, device, dtype,
    device_map, out_of_memory_retries and notes.
    """
    integer(max_new_tokens, "`max_new_tokens`", low=0, fix="give a number of decode steps",
            parameters=("max_new_tokens",))
    integer(batch_size, "`batch_size`", low=1, fix="give a number of prompts", parameters=("batch_size",))
    integer(max_batch_tokens, "`max_batch_tokens`", low=1, fix="give a number of tokens per forward pass",
            parameters=("max_batch_tokens",))
    _check_flags(chat_template=chat_template, weights=weights, trust_remote_code=trust_remote_code)
    runtime = choose_runtime(device=device, dtype=dtype, device_map=device_map)
    torch = _require_torch()
    with quiet_transformers():
        with spinner(f"reading the config of {Path(str(model_name)).name}", quiet) as step:
            model, tokenizer, runtime = _load(model_name, runtime, trust_remote_code, step)
            step("reading prompts")
            prompts = read_prompts(prompts_path, tokenizer, origin_field=origin_field, chat_template=chat_template)
        spec = from_hf_config(model.config, name=Path(str(model_name)).name)
        recorder = RoutingRecorder(model, spec.top_k)
        if recorder.layers != spec.layers:
            raise PrismError(f"the model's MoE blocks sit at layers {list(recorder.layers)} but its config says "
                             f"{list(spec.layers)}")
        vocab = int(model.get_input_embeddings().num_embeddings)
        too_big = [i for i, p in enumerate(prompts) if max(p.ids) >= vocab]
        if too_big:
            raise PrismError(f"{prompts_path}: prompt {too_big[0] + 1} has token id {max(prompts[too_big[0]].ids)}, "
                             f"beyond the model's vocabulary of {vocab}; tokenise the prompts with this model's "
                             f"tokenizer")
        meta = TraceMeta.for_model(spec, f"profile:{spec.name}")
        origins = sorted({p.origin for p in prompts})
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        runner = BatchRunner(model, recorder, meta, origins, prompts, max_new_tokens=max_new_tokens, pad=pad,
                             weights=weights, max_batch_tokens=max_batch_tokens)
        tokens = 0
        try:
            with TraceWriter(out, meta, weights) as writer, torch.inference_mode(), \
                    counter(f"profiling prompts ({runtime})", len(prompts), "tokens", quiet) as advance:
                for first in range(0, len(prompts), batch_size):
                    idx = list(range(first, min(first + batch_size, len(prompts))))
                    rows = 0
                    for trace in runner.run(idx):  # written only once the whole batch has run
                        writer.write(trace)
                        rows += trace.num_tokens
                    tokens += rows
                    advance(len(idx), rows)
        finally:
            recorder.remove()
    notes = []
    if runtime.device_map is not None and device_map is None:
        notes.append("the weights did not fit the GPU, so device_map auto spread them over every GPU and CPU memory")
    if runner.retries:
        notes.append(f"ran out of memory {runner.retries} time(s): forward passes held at most {runner.rows} "
                     f"prompts; the trace is the same as unsplit")
    return {"path": str(out), "model": spec.name, "tokens": tokens, "requests": len(prompts),
            "origins": origins, "layers": list(spec.layers), "top_k": spec.top_k,
            "decode_steps": max_new_tokens, "device": runtime.device, "dtype": runtime.dtype,
            "device_map": runtime.device_map, "out_of_memory_retries": runner.retries, "notes": notes}


class BatchRunner:
    """Runs batches of prompts through the model in forward passes that fit memory and returns each batch's
    routing as one Trace per step (prefill, then each decode step), the same however the batch was split: its
    passes' Traces are joined step by step, and nothing is returned before the whole batch has run.

    A pass holds at most `max_batch_tokens` tokens (prompts x (longest prompt + max_new_tokens)) and, once a
    pass has run out of memory, no more prompts than the half that was retried (`rows`)."""

    def __init__(self, model, recorder: RoutingRecorder, meta: TraceMeta, origins: list[str], prompts: list[Prompt],
                 *, max_new_tokens: int, pad: int, weights: bool, max_batch_tokens: int) -> None:
        self.model, self.recorder, self.meta, self.origins, self.prompts = model, recorder, meta, origins, prompts
        self.max_new_tokens, self.pad, self.weights, self.max_batch_tokens = max_new_tokens, pad, weights, \
            max_batch_tokens
        self.device = model.get_input_embeddings().weight.device
        # transformers 5.x takes the KV cache as `cache` (`past_key_values` warns); remote code may predate both
        # that and logits_to_keep
        names = inspect.signature(model.forward).parameters
        self.cache_keyword = "cache" if "cache" in names else "past_key_values"
        self.last_logits_only = "logits_to_keep" in names
        self.rows: int | None = None  # the most prompts per pass, once one has run out of memory
        self.retries = 0

    def run(self, idx: list[int]) -> list[Trace]:
        """One Trace per step of the batch of prompts `idx` (indices into `prompts`, in row order)."""
        return _join_steps([self._pass(p) for p in self.passes(idx)])

    def passes(self, idx: list[int]) -> list[list[int]]:
        """`idx` cut, in order, into passes within the token budget and `rows` (one prompt at least each)."""
        cut: list[list[int]] = [[]]
        longest = 0
        for i in idx:
            longer = max(longest, len(self.prompts[i].ids))
            full = self.rows is not None and len(cut[-1]) >= self.rows
            if cut[-1] and (full or (len(cut[-1]) + 1) * (longer + self.max_new_tokens) > self.max_batch_tokens):
                cut.append([])
                longer = len(self.prompts[i].ids)
            cut[-1].append(i)
            longest = longer
        return cut

    def _pass(self, idx: list[int]) -> list[Trace]:
        torch = _require_torch()
        try:
            return list(self._forward(idx))
        except RuntimeError as e:
            if not _out_of_memory(e):
                raise
        # Out of memory. Outside the except block the failed pass's tensors are unreachable, so they can be freed.
        self.recorder.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(idx) == 1:
            p = self.prompts[idx[0]]
            raise PrismError(f"prompt {idx[0] + 1} ({len(p.ids)} tokens + {self.max_new_tokens} decode steps) does "
                             f"not fit in memory on its own; use a shorter prompt, fewer `max_new_tokens`, `dtype` "
                             f"bfloat16 or `device_map` auto", parameters=("max_new_tokens", "dtype", "device_map"))
        half = (len(idx) + 1) // 2
        self.rows = half if self.rows is None else min(self.rows, half)
        self.retries += 1
        return _join_steps([self._pass(idx[:half]), self._pass(idx[half:])])

    def _forward(self, idx: list[int]) -> Iterator[Trace]:
        """Yield the prefill Trace of the left-padded prompts `idx`, then one Trace per greedy decode step."""
        torch = _require_torch()
        prompts, dev = [self.prompts[i] for i in idx], self.device
        b, t = len(prompts), max(len(p.ids) for p in prompts)
        input_ids = torch.full((b, t), self.pad, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, t - len(p.ids):] = torch.tensor(p.ids)
            mask[i, t - len(p.ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        last = {"logits_to_keep": 1} if self.last_logits_only else {}  # not [batch, seq, vocab] logits
        out = self.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                         use_cache=self.max_new_tokens > 0, **last)
        ids, w = self.recorder.take()
        w = w if self.weights else None
        keep = mask.numpy().astype(bool)
        yield _batch_trace(self.meta, self.origins, prompts, idx, keep, positions.numpy(), False, ids, w)
        step_pos = positions[:, -1:]
        for _ in range(self.max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
            step_pos = step_pos + 1
            out = self.model(input_ids=nxt, attention_mask=mask.to(dev), position_ids=step_pos.to(dev),
                             use_cache=True, **{self.cache_keyword: getattr(out, self.cache_keyword)})
            ids, w = self.recorder.take()
            w = w if self.weights else None
            yield _batch_trace(self.meta, self.origins, prompts, idx, np.ones((b, 1), bool), step_pos.numpy(), True,
                               ids, w)


def _join_steps(parts: list[list[Trace]]) -> list[Trace]:
    """The Traces of passes over consecutive prompts joined step by step (parts: per pass, one Trace per step)."""
    return parts[0] if len(parts) == 1 else [Trace.concat(step) for step in zip(*parts)]
