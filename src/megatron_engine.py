"""The Megatron engine of the trainer server: megatron-core's GPTModel, tensor + data parallel, LoRA.

    $ torchrun --nproc-per-node 4 -m src.trainer_server --engine megatron --tp 2 --model /models/llama --port 8100
      # 4 ranks = TP 2 x DP 2; see src/trainer_server.py for the protocol

What it guarantees:
- The base model is a Hugging Face Llama or Qwen2 folder (safetensors), mapped onto megatron-core's
  local-spec GPTModel (no Transformer Engine needed) by `hf_to_megatron` below: q/k/v are fused
  into `linear_qkv` in Megatron's grouped order (per query group: its q heads, then k, then v),
  gate/up into `linear_fc1` ([gate shard; up shard] per TP rank), the vocabulary padded to a
  multiple of TP with the padded logits masked out. Base weights are frozen.
- LoRA is "canonical": one adapter per Hugging Face module (q, k, v, o, gate, up, down, lm_head),
  attached to the fused Megatron linears with the tensor-parallel layout respected —
  column-parallel (qkv, fc1, output layer): A replicated, B sharded by output rows;
  row-parallel (proj, fc2): A sharded by input columns, B replicated. So the exported adapter is a
  plain PEFT folder (`q_proj`, `k_proj`, ... names) that PEFT and vLLM load unchanged, and PEFT
  adapters load back exactly. LoRA runs in fp32 and is added to the base output, as PEFT does.
- Data parallel: a batch is split into contiguous slices per DP rank; gradients are summed over
  DP at `optim_step` (the losses are sums over datums). Each adapter has its own optimizer over its
  few LoRA tensors, AdamW or Dimuon as chosen at creation, built by `src/optimizers.py` exactly as
  the HF trainer builds it (Dimuon's r×r Gram matrices are summed over the TP shards of a factor);
  Megatron's DistributedOptimizer is not used, since its buffers are fixed when the model is
  wrapped and cannot take adapters created at run time, and sharding the optimizer state of a
  LoRA adapter saves nothing worth the complexity.
- The LoRA scale is Tinker's (alpha 32 over the rank, `LoraSpec.scale`), as in the HF trainer and
  in the exported adapter_config.json.
- `device="cpu"` runs the real megatron-core code on CPU over gloo for tests, by pointing its
  "current CUDA device" at the CPU and skipping its CUDA RNG fork (dropout is 0). Not for training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .backends import AdamParams, DimuonParams, ForwardBackwardResult, LoraSpec, TrainDatum, UserInputError
from .optimizers import (
    STATE_KEYS,
    check_loadable_state,
    check_optim_params,
    checkpoint_lora_scale,
    make_optimizer,
    rescale_state,
    set_hyperparameters,
)

log = logging.getLogger(__name__)

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")

# HF module (suffix after model.layers.{i}.) -> (Megatron module under decoder.layers.{i}., part, kind)
LAYER_TARGETS = {
    "self_attn.q_proj": ("self_attention.linear_qkv", "q", "attn"),
    "self_attn.k_proj": ("self_attention.linear_qkv", "k", "attn"),
    "self_attn.v_proj": ("self_attention.linear_qkv", "v", "attn"),
    "self_attn.o_proj": ("self_attention.linear_proj", "o", "attn"),
    "mlp.gate_proj": ("mlp.linear_fc1", "gate", "mlp"),
    "mlp.up_proj": ("mlp.linear_fc1", "up", "mlp"),
    "mlp.down_proj": ("mlp.linear_fc2", "down", "mlp"),
}
ROW_PARALLEL = {"self_attention.linear_proj", "mlp.linear_fc2"}


# ----------------------------------------------------------------------------- shapes and config


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    padded_vocab: int
    qkv_bias: bool
    tied: bool
    rms_eps: float
    rope_theta: float
    max_positions: int

    @property
    def q_per_group(self) -> int:
        return self.heads // self.groups


def dims_from_hf(hf: Any, tp: int) -> Dims:
    """Read a transformers config; refuse what the mapping does not cover, saying what is supported."""
    arch = (getattr(hf, "architectures", None) or ["?"])[0]
    if arch not in SUPPORTED:
        raise ValueError(f"the Megatron engine maps {SUPPORTED}, not {arch}; use --engine peft for this model")
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope.get('rope_type')!r} is not mapped yet; use --engine peft")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf.hidden_act!r} is not mapped; Llama/Qwen2 use silu")
    heads, groups = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    if groups % tp:
        raise ValueError(f"--tp {tp} must divide the {groups} key/value heads of this model")
    if hf.intermediate_size % tp:
        raise ValueError(f"--tp {tp} must divide intermediate_size {hf.intermediate_size}")
    return Dims(
        layers=hf.num_hidden_layers, hidden=hf.hidden_size, heads=heads, groups=groups,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, ffn=hf.intermediate_size,
        vocab=hf.vocab_size, padded_vocab=math.ceil(hf.vocab_size / tp) * tp,
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False)),
        tied=bool(getattr(hf, "tie_word_embeddings", False)), rms_eps=hf.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        max_positions=hf.max_position_embeddings,
    )


def build_gpt(dims: Dims, dtype: torch.dtype, cpu: bool):
    """A megatron-core GPTModel (local spec) shaped like the HF model; needs model parallel initialized."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=dims.layers, hidden_size=dims.hidden, num_attention_heads=dims.heads,
        num_query_groups=dims.groups, kv_channels=dims.head_dim, ffn_hidden_size=dims.ffn,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        normalization="RMSNorm", layernorm_epsilon=dims.rms_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=dims.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=cpu, perform_initialization=False,  # every weight is overwritten from HF
    )
    return GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=dims.padded_vocab,
        max_sequence_length=dims.max_positions, position_embedding_type="rope", rotary_base=int(dims.rope_theta),
        share_embeddings_and_output_weights=dims.tied, pre_process=True, post_process=True,
    )


# ----------------------------------------------------------------------------- HF <-> Megatron weights


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: Dims) -> torch.Tensor:
    """HF q/k/v (weights [out, in] or biases [out]) -> Megatron's full linear_qkv, grouped per KV head."""
    rest = q.shape[1:]
    q = q.reshape(dims.groups, dims.q_per_group * dims.head_dim, *rest)
    k = k.reshape(dims.groups, dims.head_dim, *rest)
    v = v.reshape(dims.groups, dims.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, dims: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(dims.groups, (dims.q_per_group + 2) * dims.head_dim, *rest)
    q, k, v = grouped.split([dims.q_per_group * dims.head_dim, dims.head_dim, dims.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def hf_to_megatron(get, dims: Dims, tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """This TP rank's Megatron state dict from an HF one (`get(name) -> tensor`, read lazily)."""
    def col(t: torch.Tensor) -> torch.Tensor:  # column-parallel: split output rows
        return t.chunk(tp, dim=0)[tp_rank]

    def row(t: torch.Tensor) -> torch.Tensor:  # row-parallel: split input columns
        return t.chunk(tp, dim=1)[tp_rank]

    out = {"embedding.word_embeddings.weight": col(_pad_rows(get("model.embed_tokens.weight"), dims.padded_vocab)),
           "decoder.final_layernorm.weight": get("model.norm.weight")}
    if not dims.tied:
        out["output_layer.weight"] = col(_pad_rows(get("lm_head.weight"), dims.padded_vocab))
    for i in range(dims.layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = [get(f"{hf}self_attn.{p}_proj.weight") for p in "qkv"]
        # Groups are contiguous in the fused layout, so a TP rank's slice is whole groups.
        out[mg + "self_attention.linear_qkv.weight"] = col(fuse_qkv(*qkv, dims))
        if dims.qkv_bias:
            bias = [get(f"{hf}self_attn.{p}_proj.bias") for p in "qkv"]
            out[mg + "self_attention.linear_qkv.bias"] = col(fuse_qkv(*bias, dims))
        out[mg + "self_attention.linear_proj.weight"] = row(get(f"{hf}self_attn.o_proj.weight"))
        out[mg + "mlp.linear_fc1.weight"] = torch.cat([col(get(f"{hf}mlp.gate_proj.weight")),
                                                       col(get(f"{hf}mlp.up_proj.weight"))])
        out[mg + "mlp.linear_fc2.weight"] = row(get(f"{hf}mlp.down_proj.weight"))
        out[mg + "input_layernorm.weight"] = get(f"{hf}input_layernorm.weight")
        out[mg + "pre_mlp_layernorm.weight"] = get(f"{hf}post_attention_layernorm.weight")
    return out


def megatron_to_hf(shards: list[dict[str, torch.Tensor]], dims: Dims) -> dict[str, torch.Tensor]:
    """The HF state dict from every TP rank's Megatron state dict (in TP order): `hf_to_megatron`'s inverse."""
    def col(name: str) -> torch.Tensor:
        return torch.cat([s[name] for s in shards], dim=0)

    def row(name: str) -> torch.Tensor:
        return torch.cat([s[name] for s in shards], dim=1)

    first = shards[0]
    out = {"model.embed_tokens.weight": col("embedding.word_embeddings.weight")[: dims.vocab],
           "model.norm.weight": first["decoder.final_layernorm.weight"]}
    if not dims.tied:
        out["lm_head.weight"] = col("output_layer.weight")[: dims.vocab]
    for i in range(dims.layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        names = ("weight", "bias") if dims.qkv_bias else ("weight",)
        for kind in names:
            # Each rank's qkv slice is its own groups, so un-fuse per rank and stitch groups back.
            parts = [split_qkv(s[f"{mg}self_attention.linear_qkv.{kind}"], _local(dims, len(shards))) for s in shards]
            for j, p in enumerate("qkv"):
                out[f"{hf}self_attn.{p}_proj.{kind}"] = torch.cat([part[j] for part in parts])
        out[f"{hf}self_attn.o_proj.weight"] = row(mg + "self_attention.linear_proj.weight")
        fc1 = [s[mg + "mlp.linear_fc1.weight"].chunk(2) for s in shards]
        out[f"{hf}mlp.gate_proj.weight"] = torch.cat([g for g, _ in fc1])
        out[f"{hf}mlp.up_proj.weight"] = torch.cat([u for _, u in fc1])
        out[f"{hf}mlp.down_proj.weight"] = row(mg + "mlp.linear_fc2.weight")
        out[f"{hf}input_layernorm.weight"] = first[mg + "input_layernorm.weight"]
        out[f"{hf}post_attention_layernorm.weight"] = first[mg + "pre_mlp_layernorm.weight"]
    return out


def _local(dims: Dims, tp: int) -> Dims:
    """The dims one TP rank sees in its linear_qkv slice (fewer groups and heads)."""
    from dataclasses import replace

    return replace(dims, groups=dims.groups // tp, heads=dims.heads // tp)


def open_hf_weights(folder: str | Path):
    """`get(name) -> tensor` over every safetensors file of an HF checkpoint folder (read one tensor at a time)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors; the Megatron engine reads safetensors checkpoints")
    where = {}
    for f in files:
        with safe_open(f, framework="pt") as handle:
            where.update({name: f for name in handle.keys()})

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise KeyError(f"{folder} has no tensor {name!r}; is it a Llama/Qwen2 checkpoint?")
        with safe_open(where[name], framework="pt") as handle:
            return handle.get_tensor(name)

    return get


# ----------------------------------------------------------------------------- LoRA on parallel linears


class LoraParallelLinear(nn.Module):
    """A Megatron Column/RowParallelLinear plus the active adapter's LoRA parts, TP-aware.

    `active` maps part name -> (A, B) local tensors (fp32) and is set by the engine per operation.
    Column-parallel: y_local += B_local · copy_to_tp(A · x); the copy all-reduces dA's input
    gradient, so A (replicated) gets the same full gradient on every TP rank.
    Row-parallel: y += B · all_reduce(A_local · x_local); B is replicated and its gradient equal.
    """

    def __init__(self, base: nn.Module, name: str, dims_local: Dims):
        super().__init__()
        self.base = base
        self.name = name
        self.row = name in ROW_PARALLEL
        self.dims = dims_local
        self.active: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.scale = 1.0

    def forward(self, x, *args, **kwargs):
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        out, bias = self.base(x, *args, **kwargs)
        if not self.active:
            return out, bias
        xf = x.float()
        if self.row:
            (a, b), = self.active.values()
            y = reduce_from_tensor_model_parallel_region(xf @ a.t()) @ b.t()
        else:
            ys = {part: copy_to_tensor_model_parallel_region(xf @ a.t()) @ b.t() for part, (a, b) in self.active.items()}
            y = self._assemble(ys, out.shape[-1], xf)
        # As PEFT: add in fp32, then back to the base output's dtype.
        return (out.float() + y * self.scale).to(out.dtype), bias

    def _assemble(self, ys: dict[str, torch.Tensor], width: int, x: torch.Tensor) -> torch.Tensor:
        """Place the column parts where the fused output has them (missing parts are zero)."""
        lead = x.shape[:-1]
        d = self.dims
        if self.name == "self_attention.linear_qkv":
            sizes = {"q": d.q_per_group * d.head_dim, "k": d.head_dim, "v": d.head_dim}
            pieces = [ys[p].reshape(*lead, d.groups, n) if p in ys else x.new_zeros(*lead, d.groups, n)
                      for p, n in sizes.items()]
            return torch.cat(pieces, dim=-1).reshape(*lead, width)
        if self.name == "mlp.linear_fc1":
            half = width // 2
            return torch.cat([ys.get(p, x.new_zeros(*lead, half)) for p in ("gate", "up")], dim=-1)
        return ys["lm_head"]


@dataclass
class Adapter:
    spec: LoraSpec
    scale: float
    # HF module name (e.g. model.layers.0.self_attn.q_proj) -> (A, B) local fp32 parameters
    params: dict[str, tuple[nn.Parameter, nn.Parameter]]
    optimizer: torch.optim.Optimizer  # AdamW or Dimuon, per spec.optimizer
    step: int = 0


def target_modules(spec: LoraSpec) -> list[str]:
    """The HF module names (suffixes) an adapter trains, as in the PEFT backend."""
    names = [n.split(".")[-1] for n, (_, _, kind) in LAYER_TARGETS.items()
             if (kind == "attn" and spec.train_attn) or (kind == "mlp" and spec.train_mlp)]
    return names + (["lm_head"] if spec.train_unembed else [])


@dataclass(frozen=True)
class LoraTarget:
    """One HF LoRA target (`model.layers.0.self_attn.q_proj`) and where it lives in Megatron."""

    wrapper: str  # key of the LoraParallelLinear: "0.self_attention.linear_qkv" or "output_layer"
    part: str  # q, k, v, o, gate, up, down, lm_head
    row: bool  # row-parallel: A is split by input columns; else B is split by output rows
    fan_in: int
    fan_out: int  # full size (the padded vocabulary for lm_head)
    kind: str  # attn | mlp | unembed: which LoraSpec switch trains it


def lora_targets(dims: Dims) -> dict[str, LoraTarget]:
    d = dims
    fan_in = {"o": d.heads * d.head_dim, "down": d.ffn}
    fan_out = {"q": d.heads * d.head_dim, "k": d.groups * d.head_dim, "v": d.groups * d.head_dim,
               "o": d.hidden, "gate": d.ffn, "up": d.ffn, "down": d.hidden}
    out = {}
    for i in range(d.layers):
        for suffix, (mg, part, kind) in LAYER_TARGETS.items():
            out[f"model.layers.{i}.{suffix}"] = LoraTarget(f"{i}.{mg}", part, mg in ROW_PARALLEL,
                                                           fan_in.get(part, d.hidden), fan_out[part], kind)
    out["lm_head"] = LoraTarget("output_layer", "lm_head", False, d.hidden, d.padded_vocab, "unembed")
    return out


# ----------------------------------------------------------------------------- the engine


def _cpu_shims() -> None:
    """Let megatron-core's forward run on CPU (tests only): its buffers go to "the current CUDA device"."""
    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()  # dropout is 0


class MegatronEngine:
    """One rank of the Megatron trainer; every public method is collective (all ranks call it in order)."""

    name = "megatron"

    def __init__(self, base_model: str, tp: int = 1, dtype: str = "auto", device: str = "auto",
                 max_adapters: int = 64, seed: int = 1234, tokens_per_microbatch: int = 16384):
        from megatron.core import parallel_state, tensor_parallel
        from transformers import AutoConfig

        self.base_model = base_model
        self.cpu = device == "cpu" or not torch.cuda.is_available()
        if self.cpu:
            _cpu_shims()
        self.device = torch.device("cpu") if self.cpu else torch.device("cuda", torch.cuda.current_device())
        self.dtype = _dtype(dtype, self.cpu)
        world = dist.get_world_size()
        if world % tp:
            raise ValueError(f"--tp {tp} must divide the number of ranks {world}")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        if not self.cpu:
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        self.tp, self.tp_rank = tp, parallel_state.get_tensor_model_parallel_rank()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp, self.dp_rank = world // tp, parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.objects = dist.new_group(backend="gloo")  # python objects between ranks stay on CPU
        self.max_adapters = max_adapters
        self.tokens_per_microbatch = tokens_per_microbatch
        self.dims = dims_from_hf(AutoConfig.from_pretrained(base_model), tp)
        self.model = build_gpt(self.dims, self.dtype, self.cpu).to(self.device)
        state = hf_to_megatron(open_hf_weights(base_model), self.dims, self.tp_rank, tp)
        missing, unexpected = self.model.load_state_dict(
            {k: v.to(self.dtype) for k, v in state.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"HF->Megatron mapping mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()  # no dropout; LoRA training does not need train mode
        self.targets = lora_targets(self.dims)
        self.lora: dict[str, LoraParallelLinear] = {}
        self._wrap_linears()
        self.adapters: dict[str, Adapter] = {}

    def describe(self) -> dict[str, Any]:
        return {"tensor_parallel": self.tp, "data_parallel": self.dp, "dtype": str(self.dtype).replace("torch.", ""),
                "device": self.device.type}

    def _wrap_linears(self) -> None:
        """Put a LoraParallelLinear around every Megatron linear that holds a LoRA target."""
        local = _local(self.dims, self.tp)
        for key in {t.wrapper for t in self.targets.values()}:
            owner = self.model if key == "output_layer" else self.model.decoder.layers[int(key.split(".")[0])]
            path = key if key == "output_layer" else key.split(".", 1)[1]
            parent_path, _, attr = path.rpartition(".")
            parent = owner.get_submodule(parent_path) if parent_path else owner
            self.lora[key] = LoraParallelLinear(getattr(parent, attr), path, local)
            setattr(parent, attr, self.lora[key])

    # -- adapters

    def _hf_names(self, spec: LoraSpec) -> list[str]:
        switches = {"attn": spec.train_attn, "mlp": spec.train_mlp, "unembed": spec.train_unembed}
        return [name for name, t in self.targets.items() if switches[t.kind]]

    def _local(self, t: LoraTarget, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This TP rank's slices of full A [r, fan_in] and B [fan_out, r]."""
        if t.row:
            return a.chunk(self.tp, dim=1)[self.tp_rank], b
        return a, b.chunk(self.tp, dim=0)[self.tp_rank]

    def _adapter(self, model_id: str) -> Adapter:
        if model_id not in self.adapters:
            raise UserInputError(f"unknown model_id {model_id!r} on the trainer server", "model_id")
        return self.adapters[model_id]

    def create_adapter(self, model_id: str, spec: LoraSpec) -> None:
        if model_id in self.adapters:
            raise UserInputError(f"model_id {model_id!r} already has an adapter", "model_id")
        if len(self.adapters) >= self.max_adapters:
            raise UserInputError(f"the trainer server already holds {self.max_adapters} adapters", "model_id")
        # PEFT's init (A: kaiming-uniform, B: 0). A is drawn full with a seed every rank shares,
        # then sliced, so TP ranks agree on replicated tensors and the shards form one matrix.
        gen = torch.Generator().manual_seed(spec.seed if spec.seed is not None else _shared_seed(self.objects))
        params = {}
        for name in self._hf_names(spec):
            t = self.targets[name]
            a = torch.empty(spec.rank, t.fan_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            a, b = self._local(t, a, torch.zeros(t.fan_out, spec.rank))
            params[name] = (nn.Parameter(a.contiguous().to(self.device)), nn.Parameter(b.contiguous().to(self.device)))
        optimizer = make_optimizer(spec.optimizer, list(params.values()), spec, self._shard_reducers(params))
        self.adapters[model_id] = Adapter(spec, spec.scale, params, optimizer)

    def _shard_reducers(self, params: dict[str, tuple[nn.Parameter, nn.Parameter]]) -> dict:
        """The TP-split factor of each pair (row-parallel: A, column-parallel: B) -> sum over TP ranks."""
        if self.tp == 1:
            return {}

        def tp_sum(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            dist.all_reduce(t, group=self.tp_group)
            return t

        return {(a if self.targets[name].row else b): tp_sum for name, (a, b) in params.items()}

    def delete_adapter(self, model_id: str) -> None:
        self._adapter(model_id)
        del self.adapters[model_id]

    def has_adapter(self, model_id: str) -> bool:
        return model_id in self.adapters

    def lora_spec(self, model_id: str) -> LoraSpec:
        return self._adapter(model_id).spec

    def vocab_size(self) -> int:
        return self.dims.vocab

    @contextlib.contextmanager
    def _activated(self, adapter: Adapter | None):
        """Route every wrapped linear through `adapter`'s LoRA parts for the duration."""
        try:
            for wrapper in self.lora.values():
                wrapper.active = None
            if adapter is not None:
                for name, (a, b) in adapter.params.items():
                    t = self.targets[name]
                    wrapper = self.lora[t.wrapper]
                    wrapper.active = {**(wrapper.active or {}), t.part: (a, b)}
                    wrapper.scale = adapter.scale
            yield
        finally:
            for wrapper in self.lora.values():
                wrapper.active = None

    # -- compute

    def _target_logprobs(self, batch: list[list[int]], targets: list[np.ndarray]) -> torch.Tensor:
        """[B, L] (or [B, L, K]) fp32 logprobs of the target tokens; right-padded, pad positions garbage."""
        length = max(len(t) for t in batch)
        extra = tuple(np.shape(targets[0])[1:])  # cross_entropy may score K targets per position
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        tgt = torch.zeros(len(batch), length, *extra, dtype=torch.long)
        for i, (tokens, target) in enumerate(zip(batch, targets)):
            ids[i, : len(tokens)] = torch.tensor(tokens)
            tgt[i, : len(target)] = torch.as_tensor(np.asarray(target, dtype=np.int64))
        ids, tgt = ids.to(self.device), tgt.to(self.device)
        positions = torch.arange(length, device=self.device).expand(len(batch), length)
        # Causal mask (True = hidden); right padding never leaks into the real positions.
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool, device=self.device), diagonal=1)[None, None]
        logits = self.model(ids, positions, mask).float()  # [B, L, V/tp]; log-softmax in fp32
        return self._vocab_parallel_logprobs(logits, tgt if extra else tgt[..., None]).reshape(tgt.shape)

    def _vocab_parallel_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log softmax(logits)[targets] with the vocabulary split over TP ranks: [B, L, K].

        Every rank computes the same result; `reduce_from_tensor_model_parallel_region` sums over
        TP in the forward pass and passes the gradient through unchanged, which is right because
        everything after it is replicated on all TP ranks.
        """
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        width = logits.shape[-1]
        start = self.tp_rank * width
        if self.dims.padded_vocab != self.dims.vocab:
            padded = torch.arange(start, start + width, device=self.device) >= self.dims.vocab
            logits = logits.masked_fill(padded, float("-inf"))
        shift = logits.detach().amax(-1, keepdim=True)  # a constant: any shift gives the same log-softmax
        if self.tp > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=self.tp_group)
        total = reduce_from_tensor_model_parallel_region((logits - shift).exp().sum(-1, keepdim=True))
        local = targets - start
        mine = (local >= 0) & (local < width)
        picked = torch.where(mine, torch.gather(logits, -1, local.clamp(0, width - 1)), 0.0)  # not * (-inf * 0)
        picked = reduce_from_tensor_model_parallel_region(picked)
        return picked - shift - total.log()

    def forward_backward(self, model_id: str, data: list[TrainDatum], loss_fn: str,
                         loss_fn_config: dict[str, float | str] | None, forward_only: bool) -> ForwardBackwardResult:
        from .losses import microbatch_loss

        adapter = self._adapter(model_id)
        # On every rank, for the whole batch, before any gradient is touched.
        validate_batch(data, loss_fn, loss_fn_config, self.dims.vocab, self.dims.max_positions)
        bounds = [len(data) * r // self.dp for r in range(self.dp + 1)]
        mine = data[bounds[self.dp_rank]: bounds[self.dp_rank + 1]]
        outputs: list[dict[str, np.ndarray]] = []
        metrics: dict[str, float] = {}
        error = None
        if mine:
            try:
                with self._activated(adapter), (torch.no_grad() if forward_only else contextlib.nullcontext()):
                    for chunk in self._microbatches(mine):
                        targets = [d.loss_fn_inputs["target_tokens"] for d in chunk]
                        logprobs = self._target_logprobs([d.tokens for d in chunk], targets)
                        chunk_loss, scored = microbatch_loss(
                            loss_fn, (logprobs[i, : len(d.tokens)] for i, d in enumerate(chunk)), chunk,
                            loss_fn_config, metrics)
                        outputs.extend(scored)
                        if not forward_only:  # per micro-batch: its activations are freed before the next
                            chunk_loss.backward()
            except UserInputError as exc:
                error = (str(exc), exc.field)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.tp_rank, error, len(mine), outputs, metrics), group=self.objects)
        for _, err, _, _, _ in gathered:
            if err is not None:
                raise UserInputError(*err)
        from .trainer_server import _merge_metrics

        firsts = [g for g in gathered if g[0] == 0]  # one TP rank per DP rank, in DP order
        return ForwardBackwardResult(
            loss_fn_outputs=[o for g in firsts for o in g[3]],
            metrics=_merge_metrics([(g[2], g[4]) for g in firsts if g[2]]))

    def _microbatches(self, data: list[TrainDatum]) -> list[list[TrainDatum]]:
        """Consecutive groups whose padded size stays within `tokens_per_microbatch` (one datum at least)."""
        groups: list[list[TrainDatum]] = []
        for datum in data:
            group = groups[-1] if groups else None
            if group is not None and (len(group) + 1) * max(len(datum.tokens), *(len(d.tokens) for d in group)) \
                    <= self.tokens_per_microbatch:
                group.append(datum)
            else:
                groups.append([datum])
        return groups

    def compute_logprobs(self, model_id: str | None, tokens: list[int]):
        adapter = self._adapter(model_id) if model_id is not None else None
        with self._activated(adapter), torch.no_grad():
            lp = self._target_logprobs([tokens[:-1]], [np.asarray(tokens[1:])])[0]
        return lp.cpu().numpy().astype(np.float32)

    def optim_step(self, model_id: str, params: AdamParams | DimuonParams) -> dict[str, float]:
        adapter = self._adapter(model_id)
        check_optim_params(adapter.spec.optimizer, params, model_id)
        pairs = list(adapter.params.items())
        grads = []
        for _, pair in pairs:
            for p in pair:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        if self.dp > 1:  # the batch was split over DP ranks and the loss is a sum: sum the gradients
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
        norm = self._grad_norm(adapter)
        if params.grad_clip_norm > 0 and norm > params.grad_clip_norm:
            for g in grads:
                g.mul_(params.grad_clip_norm / (norm + 1e-6))
        set_hyperparameters(adapter.optimizer, params)
        adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        adapter.step += 1
        return {"grad_norm:mean": norm, "learning_rate:mean": params.learning_rate, "step:max": float(adapter.step)}

    def _grad_norm(self, adapter: Adapter) -> float:
        """The L2 norm of the whole adapter's gradient, as if it were not sharded."""
        sharded = replicated = torch.zeros((), device=self.device, dtype=torch.float64)
        for name, (a, b) in adapter.params.items():
            row = self.targets[name].row
            sharded = sharded + (a.grad if row else b.grad).double().pow(2).sum()
            replicated = replicated + (b.grad if row else a.grad).double().pow(2).sum()
        if self.tp > 1:
            dist.all_reduce(sharded, group=self.tp_group)
        return float((sharded + replicated).sqrt())

    # -- files (PEFT format; only rank 0 writes, every rank reads: a shared filesystem)

    def _full_tensors(self, adapter: Adapter, moments: bool = False) -> dict[str, torch.Tensor]:
        """PEFT-named full tensors (gathered over TP): `...lora_A.weight` and, with moments, the optimizer's
        per-tensor state (`...lora_A.weight.exp_avg`, `.momentum_buffer`, ...), laid out like the weight."""
        out: dict[str, torch.Tensor] = {}
        for name, (a, b) in adapter.params.items():
            row = self.targets[name].row
            sources = {"": (a, b)}
            if moments:
                state = adapter.optimizer.state
                for key in STATE_KEYS[adapter.spec.optimizer]:
                    if a in state and key in state[a]:
                        sources["." + key] = (state[a][key], state[b][key])
            for suffix, (ta, tb) in sources.items():
                ta = self._gather(ta, dim=1) if row else ta
                tb = tb if row else self._gather(tb, dim=0)
                if name == "lm_head":
                    tb = tb[: self.dims.vocab]
                out[f"base_model.model.{name}.lora_A.weight{suffix}"] = ta.detach().float().cpu().contiguous()
                out[f"base_model.model.{name}.lora_B.weight{suffix}"] = tb.detach().float().cpu().contiguous()
        return out

    def _gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if self.tp == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.tp)]
        dist.all_gather(parts, t.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)

    def export_adapter(self, model_id: str, directory: Path) -> None:
        adapter = self._adapter(model_id)
        tensors = self._full_tensors(adapter)
        if dist.get_rank() == 0:
            _write_peft(Path(directory), tensors, adapter.spec, self.base_model, target_modules(adapter.spec))

    def save_state(self, model_id: str, directory: Path) -> None:
        from safetensors.torch import save_file

        adapter = self._adapter(model_id)
        tensors = self._full_tensors(adapter, moments=True)
        if dist.get_rank() != 0:
            return
        weights = {k: v for k, v in tensors.items() if k.endswith(".weight")}
        _write_peft(Path(directory), weights, adapter.spec, self.base_model, target_modules(adapter.spec))
        save_file({k: v for k, v in tensors.items() if not k.endswith(".weight")},
                  str(Path(directory) / "optimizer.safetensors"))
        (Path(directory) / "tink_state.json").write_text(json.dumps(
            {"lora_spec": dict(adapter.spec.__dict__), "step": adapter.step, "engine": self.name}))

    def load_state(self, model_id: str, directory: Path, with_optimizer: bool) -> None:
        from safetensors.torch import load_file

        adapter = self._adapter(model_id)
        directory = Path(directory)
        weights_file = directory / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise UserInputError(f"{directory} has no adapter_model.safetensors", "path")
        check_loadable_state(directory, adapter.spec.optimizer, with_optimizer)
        saved = load_file(str(weights_file))
        if with_optimizer:
            saved.update(_read_moments(directory))
        state = json.loads((directory / "tink_state.json").read_text()) if (directory / "tink_state.json").is_file() else {}
        # PEFT files may name weights with or without the adapter name (`lora_A.default.weight`).
        saved = {k.replace(".default.weight", ".weight"): v for k, v in saved.items()}
        # A folder trained under another LoRA scale: B (and its state) rescaled so the function is the folder's.
        factor = checkpoint_lora_scale(directory, adapter.scale) / adapter.scale
        if factor != 1.0:
            saved = {k: _rescaled(k, v, factor) if ".lora_B." in k else v for k, v in saved.items()}
        adapter.optimizer.state.clear()  # a load starts from the file's optimizer state, or from none
        adapter.step = 0
        with torch.no_grad():
            for name, (a, b) in adapter.params.items():
                for suffix in ("", *(f".{key}" for key in STATE_KEYS[adapter.spec.optimizer])):
                    ka, kb = (f"base_model.model.{name}.lora_{x}.weight{suffix}" for x in "AB")
                    if ka not in saved or kb not in saved:
                        if suffix == "":
                            raise UserInputError(f"{directory}: the adapter has no LoRA weights for {name}", "path")
                        continue
                    ta, tb = saved[ka], saved[kb]
                    if ta.shape[0] != adapter.spec.rank:
                        raise UserInputError(f"{directory}: rank {ta.shape[0]} differs from this model's "
                                             f"rank {adapter.spec.rank}", "path")
                    if name == "lm_head":
                        tb = _pad_rows(tb, self.dims.padded_vocab)
                    ta, tb = self._local(self.targets[name], ta, tb)
                    if suffix == "":
                        a.copy_(ta)
                        b.copy_(tb)
                    else:
                        for p, t in ((a, ta), (b, tb)):
                            st = adapter.optimizer.state[p]
                            st[suffix[1:]] = t.to(self.device, p.dtype).clone()
                            if adapter.spec.optimizer == "adamw":
                                st["step"] = torch.tensor(float(state.get("step", 0)))
                            adapter.step = int(state.get("step", 0))


def validate_batch(data: list[TrainDatum], loss_fn: str, config: dict[str, float | str] | None, vocab: int,
                   max_tokens: int | None = None) -> None:
    """Raise `UserInputError` naming `data[i]...` unless every datum can run (indices of the whole batch)."""
    from .losses import validate_inputs

    if not data:
        raise UserInputError("data must contain at least one datum", "data")
    for i, datum in enumerate(data):
        tokens = np.asarray(datum.tokens, dtype=np.int64)
        if tokens.size == 0 or ((tokens < 0) | (tokens >= vocab)).any():
            raise UserInputError(f"model_input needs token ids in [0, {vocab})", f"data[{i}].model_input")
        if max_tokens is not None and tokens.size > max_tokens:
            raise UserInputError(f"{tokens.size} tokens exceed the model's {max_tokens} positions",
                                 f"data[{i}].model_input")
        validate_inputs(loss_fn, datum.loss_fn_inputs, len(tokens), i, config)
        targets = np.asarray(datum.loss_fn_inputs["target_tokens"])
        if ((targets < 0) | (targets >= vocab)).any():
            raise UserInputError(f"target token ids must be in [0, {vocab})", f"data[{i}].loss_fn_inputs.target_tokens")


def _rescaled(key: str, tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """A saved B weight (`...lora_B.weight`) or its state (`...lora_B.weight.exp_avg`) under B -> factor·B."""
    name, _, moment = key.rpartition(".")
    if name.endswith(".weight"):  # a state tensor
        return rescale_state({moment: tensor}, factor)[moment]
    return tensor * factor


def _read_moments(directory: Path) -> dict[str, torch.Tensor]:
    """Optimizer state as `<PEFT key>.<name>` (`exp_avg`, `momentum_buffer`, ...): ours (safetensors) or the
    HF engine's `optimizer.pt`."""
    from safetensors.torch import load_file

    if (directory / "optimizer.safetensors").is_file():
        return load_file(str(directory / "optimizer.safetensors"))
    if (directory / "optimizer.pt").is_file():  # tensors only: weights_only refuses arbitrary pickles
        saved = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        names = {name for keys in STATE_KEYS.values() for name in keys}
        return {f"{key}.{name}": t for key, moments in saved.get("state", {}).items()
                for name, t in moments.items() if name in names}
    return {}


def _write_peft(directory: Path, tensors: dict[str, torch.Tensor], spec: LoraSpec, base_model: str,
                modules: list[str]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": spec.rank, "lora_alpha": spec.lora_alpha,
              "lora_dropout": 0.0, "bias": "none", "target_modules": modules, "fan_in_fan_out": False,
              "inference_mode": True, "use_rslora": False, "use_dora": False}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def _shared_seed(group) -> int:
    """A random seed drawn on rank 0 and shared, so unseeded adapters still agree across ranks."""
    seed = [int(torch.randint(0, 2**31 - 1, ()).item())]
    dist.broadcast_object_list(seed, src=0, group=group)
    return seed[0]


def _dtype(name: str, cpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.float32 if cpu else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


