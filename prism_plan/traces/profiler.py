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

Needs the `profile` extra (torch, transformers).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism_plan.errors import MissingInputError, PrismError
from prism_plan.placement.checks import text
from prism_plan.placement.model import from_hf_config
from prism_plan.progress import counter
from prism_plan.traces.dumps import json_ints, json_lines, reason
from prism_plan.traces.trace import Trace, TraceMeta, TraceWriter

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


def read_prompts(path: str | Path, tokenizer=None, origin_field: str = "origin",
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

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


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


def load_model(name_or_path: str | Path):
    """(model in eval mode, float32, on CPU; tokenizer or None). A local folder is read offline."""
    torch = _require_torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(name_or_path)
    local = path.exists()
    if local:
        _local_model(path)
    elif _looks_like_path(str(name_or_path)):
        raise MissingInputError(f"no model folder at {name_or_path}; give a local model folder or a hub id "
                                f"(org/name)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # loading chatter is not the user's business; errors still raise
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=torch.float32,
                                                     local_files_only=local)
        tokenizer = None
        if not local or any((path / f).exists() for f in TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local)
            except Exception:  # a tokenizer is optional: prompts may give input_ids
                tokenizer = None
    except (OSError, ValueError) as e:
        raise PrismError(f"cannot load model {name_or_path}: {reason(e)}; give a complete model folder or a "
                         f"hub id")
    except Exception as e:  # damaged weights: safetensors, torch and transformers each raise their own kind
        files = sorted(p.name for p in path.glob("*.safetensors")) or sorted(p.name for p in path.glob("*.bin"))
        raise PrismError(f"cannot load the weights of {name_or_path} ({', '.join(files) or 'none found'}): "
                         f"{reason(e)}; the weights are damaged or incomplete: save or download the model again")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


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
                  max_new_tokens: int = 0, batch_size: int = 8, chat_template: bool = False, weights: bool = True,
                  quiet: bool = False) -> dict:
    """Run the model over the prompts (greedy decoding for `max_new_tokens` steps) and write every token's
    routing to a Parquet trace at `out`, batch by batch. Returns a summary (tokens, requests, layers, ...)."""
    torch = _require_torch()
    model, tokenizer = load_model(model_name)
    prompts = read_prompts(prompts_path, tokenizer, origin_field, chat_template)
    spec = from_hf_config(model.config, name=Path(str(model_name)).name)
    recorder = RoutingRecorder(model, spec.top_k)
    if recorder.layers != spec.layers:
        raise PrismError(f"the model's MoE blocks sit at layers {list(recorder.layers)} but its config says "
                         f"{list(spec.layers)}")
    vocab = int(model.get_input_embeddings().num_embeddings)
    too_big = [i for i, p in enumerate(prompts) if max(p.ids) >= vocab]
    if too_big:
        raise PrismError(f"{prompts_path}: prompt {too_big[0] + 1} has token id {max(prompts[too_big[0]].ids)}, beyond "
                         f"the model's vocabulary of {vocab}; tokenise the prompts with this model's tokenizer")
    meta = TraceMeta.for_model(spec, f"profile:{spec.name}")
    origins = sorted({p.origin for p in prompts})
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    tokens = 0
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    try:
        with TraceWriter(out, meta, weights) as writer, torch.inference_mode(), \
                counter("profiling prompts", len(prompts), "tokens", quiet) as advance:
            for idx in batches:
                for trace in _run_batch(model, recorder, meta, origins, [prompts[i] for i in idx], idx,
                                        max_new_tokens, pad, weights):
                    writer.write(trace)
                    tokens += trace.num_tokens
                    advance(0, trace.num_tokens)
                advance(len(idx), 0)
    finally:
        recorder.remove()
    return {"path": str(out), "model": spec.name, "tokens": tokens, "requests": len(prompts),
            "origins": origins, "layers": list(spec.layers), "top_k": spec.top_k,
            "decode_steps": max_new_tokens}


def _run_batch(model, recorder: RoutingRecorder, meta: TraceMeta, origins: list[str], prompts: list[Prompt],
               requests: list[int], max_new_tokens: int, pad: int, weights: bool):
    """Yield the prefill Trace of a left-padded batch, then one Trace per greedy decode step."""
    import torch

    lengths = np.array([len(p.ids) for p in prompts])
    b, t = len(prompts), int(lengths.max())
    input_ids = torch.full((b, t), pad, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, t - len(p.ids):] = torch.tensor(p.ids)
        mask[i, t - len(p.ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=max_new_tokens > 0)
    ids, w = recorder.take()
    keep = mask.numpy().astype(bool)
    yield _batch_trace(meta, origins, prompts, requests, keep, positions.numpy(), False, ids, w if weights else None)
    step_pos = positions[:, -1:]
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
        step_pos = step_pos + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=step_pos, past_key_values=out.past_key_values,
                    use_cache=True)
        ids, w = recorder.take()
        yield _batch_trace(meta, origins, prompts, requests, np.ones((b, 1), bool), step_pos.numpy(), True, ids,
                           w if weights else None)
