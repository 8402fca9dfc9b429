"""ModelSpec: the shape of a Mixture-of-Experts model as far as placement cares.

Built from a Hugging Face config (a dict, a `config.json`, a model directory or a transformers config object)
or from one of the presets, which are the published configs' MoE fields of real models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from prism_plan.errors import PrismError
from prism_plan.fileio import read_user_json

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if isinstance(self.expert_bytes, (list, tuple, np.ndarray)):
            object.__setattr__(self, "expert_bytes", tuple(int(x) for x in self.expert_bytes))
            if len(self.expert_bytes) != len(self.layers):
                raise PrismError(f"model {self.name!r}: expert_bytes has {len(self.expert_bytes)} values "
                                 f"but the model has {len(self.layers)} MoE layers; give one value per layer")
        if not self.layers:
            raise PrismError(f"model {self.name!r} has no MoE layers")
        if len(set(self.layers)) != len(self.layers):
            raise PrismError(f"model {self.name!r}: MoE layer numbers repeat: {list(self.layers)}")
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise PrismError(f"model {self.name!r}: need 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                             f"num_experts={self.num_experts}")
        if min(self.layer_bytes) <= 0 or self.hidden_size <= 0:
            raise PrismError(f"model {self.name!r}: expert_bytes and hidden_size must be positive")
        if self.num_hidden_layers == 0:
            object.__setattr__(self, "num_hidden_layers", max(self.layers) + 1)
        if self.expert_flops <= 0:
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
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        """Inverse of `to_dict`; unknown keys are an error so typos are caught."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise PrismError(f"model description has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

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


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _weight_bytes(params: int, cfg: Mapping[str, Any], rows: int, cols: int) -> int:
    """Bytes of `params` expert weights (3 matrices of rows x cols) under the config's dtype or quantisation."""
    quant = cfg.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    if method == "fp8":
        block = quant.get("weight_block_size") or [128, 128]
        scales = 3 * math.ceil(rows / block[0]) * math.ceil(cols / block[1])
        return params + 4 * scales  # one byte per weight, a float32 scale per block
    if method == "mxfp4":
        return params // 2 + params // 32  # two weights per byte, one 8-bit scale per 32 weights
    dtype = str(_get(cfg, "dtype", "torch_dtype", default="bfloat16")).replace("torch.", "")
    if dtype not in _DTYPE_BYTES:
        raise PrismError(f"unknown weight dtype {dtype!r} in model config; use one of {sorted(_DTYPE_BYTES)}")
    return params * _DTYPE_BYTES[dtype]


def _moe_layers(cfg: Mapping[str, Any], n_layers: int) -> list[int]:
    """The MoE layer numbers of a config, following each family's rule for dense layers."""
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:  # DeepSeek V2/V3
        first = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        return [i for i in range(first, n_layers) if i % freq == 0]
    if "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg:  # Qwen2-MoE / Qwen3-MoE
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    if "moe_layers" in cfg:
        return [int(i) for i in cfg["moe_layers"]]
    return list(range(n_layers))  # Mixtral, OLMoE, GPT-OSS, Phi-MoE: every layer is MoE


def from_hf_config(config: Any, name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config: a dict, a transformers config object, a path to
    `config.json` or a model directory that holds one."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        cfg = read_user_json(path, "model config (pass a preset name, a config.json or a model folder)")
        name = name or path.parent.name
    elif hasattr(config, "to_dict"):
        cfg = config.to_dict()
    else:
        cfg = dict(config)
    cfg = {**cfg.get("text_config", {}), **cfg} if "text_config" in cfg else cfg
    name = name or cfg.get("_name_or_path") or cfg.get("model_type") or "model"

    n_experts = _get(cfg, "n_routed_experts", "num_local_experts", "num_experts")
    top_k = _get(cfg, "num_experts_per_tok", "experts_per_token", "num_selected_experts")
    n_layers = _get(cfg, "num_hidden_layers", "num_layers")
    hidden = _get(cfg, "hidden_size", "d_model")
    inter = _get(cfg, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
    missing = [k for k, v in [("number of routed experts", n_experts), ("top-k", top_k),
                              ("num_hidden_layers", n_layers), ("hidden_size", hidden),
                              ("moe_intermediate_size", inter)] if v is None]
    if missing:
        raise PrismError(f"model config {name!r} is not a MoE config this tool knows: missing "
                         f"{', '.join(missing)}; write the ModelSpec by hand or pass a preset")
    n_layers, hidden, inter = int(n_layers), int(hidden), int(inter)
    expert_bytes = _weight_bytes(3 * hidden * inter, cfg, hidden, inter)
    if "gpt_oss" in str(cfg.get("model_type", "")):
        expert_bytes += 2 * (2 * inter + hidden)  # GPT-OSS experts carry bf16 biases
    n_shared = int(_get(cfg, "n_shared_experts", default=0) or 0)
    shared_inter = cfg.get("shared_expert_intermediate_size")
    shared_bytes = 0
    if shared_inter:  # Qwen2-MoE: one shared expert of its own width
        n_shared = 1
        shared_bytes = _weight_bytes(3 * hidden * int(shared_inter), {**cfg, "quantization_config": None},
                                     hidden, int(shared_inter))
    elif n_shared:
        shared_bytes = expert_bytes
    return ModelSpec(
        name=str(name),
        layers=tuple(_moe_layers(cfg, n_layers)),
        num_experts=int(n_experts),
        top_k=int(top_k),
        expert_bytes=int(expert_bytes),
        hidden_size=hidden,
        act_bytes=2,
        shared_experts=n_shared,
        shared_expert_bytes=int(shared_bytes),
        num_hidden_layers=n_layers,
        family=str(cfg.get("model_type", "")),
        expert_flops=2 * 3 * hidden * inter,
    )


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
        "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "hidden_size": 7168,
        "moe_intermediate_size": 2048, "torch_dtype": "bfloat16",
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
        return ModelSpec.from_dict(meta["spec"])
    if meta.get("model") in PRESET_CONFIGS:
        return resolve_model(meta["model"])
    raise PrismError(f"{what} do not say which model they are for: pass `model` (a preset, a config.json or a "
                     f"model folder)", parameters=("model",))
