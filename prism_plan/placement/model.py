"""ModelSpec: the shape of a Mixture-of-Experts model as far as placement cares.

Built from a Hugging Face config (a dict, a `config.json`, a model directory or a transformers config object)
or from one of the presets, which are the published configs' MoE fields of real models.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import read_user_json
from prism_plan.placement.checks import integer, text

# Ceilings no real model reaches, so that sizes stay well inside int64 arithmetic; experts are ids of int16 in
# traces.
MAX_EXPERTS = 2**15
MAX_LAYERS = 10_000
MAX_WIDTH = 2**20
MAX_BYTES = 2**40

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1, "int8": 1}


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a MoE model.

    layers: the model's own numbers of its MoE layers (dense layers left out), e.g. 1..26 for DeepSeek-V2-Lite.
    expert_bytes: bytes of one routed expert's weights; one value, or one per MoE layer.
    hidden_size, act_bytes: a token's hidden state is hidden_size * act_bytes bytes on the wire.
    shared_experts, shared_expert_bytes: experts every token uses; always local, so they never enter placement.
    num_hidden_layers: all decoder layers, dense included (SGLang numbers layers this way).
    expert_flops: FLOPs one token costs in one routed expert (2 x its weights); 0 means estimate it from
        expert_bytes, taking one weight as act_bytes bytes.
    expert_groups: groups of consecutive experts the router picks from (the HF config's `n_group`, 8 for
        DeepSeek-V3); EPLB's hierarchical policy keeps each group on one node.
    """

    name: str
    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_bytes: int | tuple[int, ...]
    hidden_size: int
    act_bytes: int = 2
    shared_experts: int = 0
    shared_expert_bytes: int = 0
    num_hidden_layers: int = 0
    family: str = ""
    expert_flops: int = 0
    expert_groups: int = 1

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        text(self.name, "a model's `name`")
        if not isinstance(self.family, str):
            raise PrismError(f"{where}: `family` must be a string, got {self.family!r}")
        if not isinstance(self.layers, (list, tuple, np.ndarray)) or not len(self.layers):
            raise PrismError(f"{where}: `layers` must be a non-empty list of MoE layer numbers, got {self.layers!r}")
        layers = tuple(integer(x, f"{where}: every MoE layer number", low=0, high=MAX_LAYERS) for x in self.layers)
        object.__setattr__(self, "layers", layers)
        if len(set(layers)) != len(layers):
            raise PrismError(f"{where}: MoE layer numbers repeat: {list(layers)}; list each layer once")
        e = integer(self.num_experts, f"{where}: `num_experts`", low=1, high=MAX_EXPERTS)
        integer(self.top_k, f"{where}: `top_k` (experts per token)", low=1, high=e)
        if isinstance(self.expert_bytes, (list, tuple, np.ndarray)):
            sizes = tuple(integer(x, f"{where}: every `expert_bytes` value", low=1, high=MAX_BYTES)
                          for x in self.expert_bytes)
            object.__setattr__(self, "expert_bytes", sizes)
            if len(sizes) != len(layers):
                raise PrismError(f"{where}: expert_bytes has {len(sizes)} values but the model has {len(layers)} "
                                 f"MoE layers; give one value per layer")
        else:
            integer(self.expert_bytes, f"{where}: `expert_bytes`", low=1, high=MAX_BYTES)
        integer(self.hidden_size, f"{where}: `hidden_size`", low=1, high=MAX_WIDTH)
        integer(self.act_bytes, f"{where}: `act_bytes`", low=1, high=8)
        integer(self.shared_experts, f"{where}: `shared_experts`", low=0, high=MAX_EXPERTS)
        integer(self.shared_expert_bytes, f"{where}: `shared_expert_bytes`", low=0, high=MAX_BYTES)
        integer(self.expert_flops, f"{where}: `expert_flops` (0: estimate it)", low=0, high=2**62)
        integer(self.expert_groups, f"{where}: `expert_groups`", low=1, high=e)
        if e % self.expert_groups:
            raise PrismError(f"{where}: {e} experts do not split into {self.expert_groups} equal `expert_groups`; "
                             f"give a divisor of {e} (the config's n_group)")
        if self.num_hidden_layers == 0:
            object.__setattr__(self, "num_hidden_layers", max(layers) + 1)
        integer(self.num_hidden_layers, f"{where}: `num_hidden_layers` (0: the last MoE layer + 1)",
                low=max(layers) + 1, high=MAX_LAYERS + 1)
        if self.expert_flops == 0:
            object.__setattr__(self, "expert_flops", 2 * int(self.layer_bytes.max()) // self.act_bytes)

    @property
    def num_layers(self) -> int:
        """Number of MoE layers."""
        return len(self.layers)

    @property
    def layer_bytes(self) -> np.ndarray:
        """bytes: [layers] int64, the size of one routed expert in each MoE layer."""
        if isinstance(self.expert_bytes, tuple):
            return np.asarray(self.expert_bytes, dtype=np.int64)
        return np.full(self.num_layers, self.expert_bytes, dtype=np.int64)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's hidden state sent over the network (one way)."""
        return self.hidden_size * self.act_bytes

    @property
    def routed_bytes(self) -> int:
        """Bytes of one copy of every routed expert."""
        return int(self.layer_bytes.sum()) * self.num_experts

    def to_dict(self) -> dict:
        """Plain-data form for JSON (plans, metadata)."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        if isinstance(self.expert_bytes, tuple):
            d["expert_bytes"] = list(self.expert_bytes)
        if self.expert_groups == 1:  # an optional key: files written before it existed read and hash the same
            del d["expert_groups"]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "model description", fix: str = "") -> "ModelSpec":
        """Inverse of `to_dict`; unknown or missing keys and values of the wrong type are errors that begin with
        `where` (the file the description is in) and end with `fix` (how to make a good one), so typos are
        caught."""
        end = f"; {fix}" if fix else ""
        if not isinstance(d, dict):
            raise PrismError(f"{where}: the model description must be a JSON object, got {d!r}{end}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise PrismError(f"{where}: model description has unknown keys {sorted(unknown)}; known: "
                             f"{sorted(fields)}{end}")
        missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING]
        if missing:
            raise PrismError(f"{where}: model description lacks {', '.join(missing)}{end}")
        try:
            return cls(**d)
        except PrismError as e:
            raise PrismError(f"{where}: {e}{end}") from None

    def check_same_shape(self, other: "ModelSpec", what: str, fix: str = "pass the matching `model`",
                         parameters: tuple[str, ...] = ("model",)) -> None:
        """Raise when `other` (read from `what`) describes a different MoE shape than this model; `fix` says
        what to do (naming `parameters`)."""
        for attr in ("layers", "num_experts", "top_k"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if mine != theirs:
                raise PrismError(f"{what} is for a different model: {attr} {_short(theirs)} there, "
                                 f"{_short(mine)} in {self.name!r}; {fix}", parameters=parameters)


def _short(v: Any) -> str:
    if isinstance(v, tuple) and len(v) > 6:
        return f"[{v[0]}..{v[-1]}] ({len(v)} layers)"
    return str(list(v) if isinstance(v, tuple) else v)


def _first(cfg: Mapping[str, Any], *keys: str) -> str | None:
    """The first of `keys` the config sets to something other than null."""
    return next((k for k in keys if cfg.get(k) is not None), None)


def _int(cfg: Mapping[str, Any], key: str, where: str, low: int = 1, high: int = MAX_WIDTH) -> int:
    return integer(cfg[key], f"{where}: `{key}`", low=low, high=high)


def _weight_bytes(params: int, cfg: Mapping[str, Any], rows: int, cols: int, where: str) -> int:
    """Bytes of `params` expert weights (3 matrices of rows x cols) under the config's dtype or quantisation."""
    quant = cfg.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise PrismError(f"{where}: `quantization_config` must be an object, got {quant!r}")
    method = quant.get("quant_method", "")
    if not isinstance(method, str):
        raise PrismError(f"{where}: `quant_method` must be a string, got {method!r}")
    if method.lower() == "fp8":
        block = quant.get("weight_block_size") or [128, 128]
        if not isinstance(block, list) or len(block) != 2:
            raise PrismError(f"{where}: `weight_block_size` must be [rows, columns], got {block!r}")
        b0, b1 = (integer(b, f"{where}: every `weight_block_size` value", low=1, high=MAX_WIDTH) for b in block)
        scales = 3 * math.ceil(rows / b0) * math.ceil(cols / b1)
        return params + 4 * scales  # one byte per weight, a float32 scale per block
    if method.lower() == "mxfp4":
        return params // 2 + params // 32  # two weights per byte, one 8-bit scale per 32 weights
    dtype = cfg.get(_first(cfg, "dtype", "torch_dtype") or "", "bfloat16")
    if type(dtype).__module__ == "torch":  # a transformers config object holds a torch.dtype
        dtype = str(dtype)
    dtype = dtype.replace("torch.", "") if isinstance(dtype, str) else dtype
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise PrismError(f"{where}: unknown weight dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    return params * _DTYPE_BYTES[dtype]


def _layer_list(cfg: Mapping[str, Any], key: str, where: str, n_layers: int) -> list[int]:
    value = [] if cfg.get(key) is None else cfg[key]
    if not isinstance(value, list):
        raise PrismError(f"{where}: `{key}` must be a list of layer numbers, got {value!r}")
    return [integer(i, f"{where}: every `{key}` value", low=0, high=n_layers - 1,
                    fix=f"layers are numbered 0..{n_layers - 1}") for i in value]


def _moe_layers(cfg: Mapping[str, Any], n_layers: int, where: str) -> list[int]:
    """The MoE layer numbers of a config, following each family's rule for dense layers."""
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:  # DeepSeek V2/V3
        first = 0 if cfg.get("first_k_dense_replace") is None else _int(cfg, "first_k_dense_replace", where, low=0)
        freq = 1 if cfg.get("moe_layer_freq") is None else _int(cfg, "moe_layer_freq", where)
        return [i for i in range(first, n_layers) if i % freq == 0]
    if "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg:  # Qwen2-MoE / Qwen3-MoE
        step = 1 if cfg.get("decoder_sparse_step") is None else _int(cfg, "decoder_sparse_step", where)
        dense = set(_layer_list(cfg, "mlp_only_layers", where, n_layers))
        return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    if "moe_layers" in cfg:
        return _layer_list(cfg, "moe_layers", where, n_layers)
    return list(range(n_layers))  # Mixtral, OLMoE, GPT-OSS, Phi-MoE: every layer is MoE


def from_hf_config(config: Any, name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config: a dict, a transformers config object, a path to
    `config.json` or a model directory that holds one. Every field it reads must have the type the config
    format gives it (an integer is never a string, a float or a bool)."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        cfg = read_user_json(path, "model config (pass a preset name, a config.json or a model folder)")
        name = name or path.parent.name
        where = str(path)
    else:
        cfg = config.to_dict() if hasattr(config, "to_dict") else config
        where = f"model config {name or 'given'}"
    if not isinstance(cfg, Mapping):
        raise PrismError(f"{where}: a model config must be a JSON object, got {type(cfg).__name__}; pass a "
                         f"Hugging Face config.json")
    if "text_config" in cfg:
        if not isinstance(cfg["text_config"], dict):
            raise PrismError(f"{where}: `text_config` must be an object, got {cfg['text_config']!r}")
        cfg = {**cfg["text_config"], **cfg}
    name = name or cfg.get("_name_or_path") or cfg.get("model_type") or "model"
    family = cfg.get("model_type", "")
    if not isinstance(family, str):
        raise PrismError(f"{where}: `model_type` must be a string, got {family!r}")

    keys = {"number of routed experts": _first(cfg, "n_routed_experts", "num_local_experts", "num_experts"),
            "top-k": _first(cfg, "num_experts_per_tok", "experts_per_token", "num_selected_experts"),
            "num_hidden_layers": _first(cfg, "num_hidden_layers", "num_layers"),
            "hidden_size": _first(cfg, "hidden_size", "d_model"),
            "moe_intermediate_size": _first(cfg, "moe_intermediate_size", "expert_intermediate_size",
                                            "intermediate_size")}
    missing = [what for what, key in keys.items() if key is None]
    if missing:
        raise PrismError(f"model config {name!r} is not a MoE config this tool knows: missing "
                         f"{', '.join(missing)}; write the ModelSpec by hand or pass a preset")
    n_experts = _int(cfg, keys["number of routed experts"], where, high=MAX_EXPERTS)
    top_k = _int(cfg, keys["top-k"], where, high=n_experts)
    n_layers = _int(cfg, keys["num_hidden_layers"], where, high=MAX_LAYERS)
    hidden = _int(cfg, keys["hidden_size"], where)
    inter = _int(cfg, keys["moe_intermediate_size"], where)
    layers = _moe_layers(cfg, n_layers, where)
    if not layers:
        raise PrismError(f"{where}: none of its {n_layers} layers is a MoE layer; check num_hidden_layers and the "
                         f"keys that make layers dense")
    expert_bytes = _weight_bytes(3 * hidden * inter, cfg, hidden, inter, where)
    if "gpt_oss" in family:
        expert_bytes += 2 * (2 * inter + hidden)  # GPT-OSS experts carry bf16 biases
    groups = 1 if cfg.get("n_group") is None else _int(cfg, "n_group", where, high=n_experts)
    n_shared = 0 if cfg.get("n_shared_experts") is None else _int(cfg, "n_shared_experts", where, low=0,
                                                                  high=MAX_EXPERTS)
    shared_inter = 0 if cfg.get("shared_expert_intermediate_size") is None else _int(
        cfg, "shared_expert_intermediate_size", where, low=0)
    shared_bytes = 0
    if shared_inter:  # Qwen2-MoE: one shared expert of its own width
        n_shared = 1
        shared_bytes = _weight_bytes(3 * hidden * shared_inter, {**cfg, "quantization_config": None},
                                     hidden, shared_inter, where)
    elif n_shared:
        shared_bytes = expert_bytes
    try:
        return ModelSpec(name=str(name), layers=tuple(layers), num_experts=n_experts, top_k=top_k,
                         expert_bytes=expert_bytes, hidden_size=hidden, act_bytes=2, shared_experts=n_shared,
                         shared_expert_bytes=shared_bytes, num_hidden_layers=n_layers, family=family,
                         expert_flops=2 * 3 * hidden * inter, expert_groups=groups)
    except PrismError as e:
        raise PrismError(f"{where}: {e}") from None


# The MoE fields of the published Hugging Face configs of each preset model.
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek-v2-lite": {  # deepseek-ai/DeepSeek-V2-Lite
        "model_type": "deepseek_v2", "num_hidden_layers": 27, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2, "hidden_size": 2048,
        "moe_intermediate_size": 1408, "torch_dtype": "bfloat16"},
    "mixtral-8x7b": {  # mistralai/Mixtral-8x7B-v0.1
        "model_type": "mixtral", "num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
        "hidden_size": 4096, "intermediate_size": 14336, "torch_dtype": "bfloat16"},
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B
        "model_type": "qwen3_moe", "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_size": 2048, "moe_intermediate_size": 768,
        "torch_dtype": "bfloat16"},
    "deepseek-v3": {  # deepseek-ai/DeepSeek-V3 (FP8 weights with 128x128 block scales)
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 8,
        "hidden_size": 7168, "moe_intermediate_size": 2048, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
    "olmoe-1b-7b": {  # allenai/OLMoE-1B-7B-0924
        "model_type": "olmoe", "num_hidden_layers": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "hidden_size": 2048, "intermediate_size": 1024, "torch_dtype": "bfloat16"},
    "gpt-oss-120b": {  # openai/gpt-oss-120b (MXFP4 expert weights)
        "model_type": "gpt_oss", "num_hidden_layers": 36, "num_local_experts": 128, "num_experts_per_tok": 4,
        "hidden_size": 2880, "intermediate_size": 2880, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4"}},
}

PRESETS = tuple(PRESET_CONFIGS)


def resolve_model(spec: "str | Path | ModelSpec") -> ModelSpec:
    """A ModelSpec from a preset name, a `config.json` path or a model directory."""
    if isinstance(spec, ModelSpec):
        return spec
    key = str(spec)
    if key in PRESET_CONFIGS:
        return from_hf_config(PRESET_CONFIGS[key], name=key)
    path = Path(key)
    if path.exists():
        return from_hf_config(path)
    raise PrismError(f"unknown model {key!r}: give a preset ({', '.join(PRESETS)}), "
                     f"a config.json or a model folder", parameters=("model",))


def model_from_meta(meta: Mapping[str, Any], what: str) -> ModelSpec:
    """The model a trace or tables file was recorded from: its stored shape (`spec`), else its preset name.
    what: names the file in the error raised when it says neither."""
    if meta.get("spec"):
        return ModelSpec.from_dict(meta["spec"], what, "rebuild it with prism-plan")
    if meta.get("model") in PRESET_CONFIGS:
        return resolve_model(meta["model"])
    raise PrismError(f"{what} do not say which model they are for: pass `model` (a preset, a config.json or a "
                     f"model folder)", parameters=("model",))
