"""The optimizers a Tinker model can be created with (`optimizer_config.type`): AdamW and Dimuon.

Both trainers (HF PEFT and Megatron) build an adapter's optimizer with `make_optimizer` and
validate a step's hyperparameters with `check_optim_params`, so the two engines step alike.

Dimuon is Tinker's Muon-style optimizer for LoRA. Tinker documents its knobs (`DimuonParams`:
`learning_rate`, `beta1`, `grad_clip_norm`; earlier SDKs also exposed `damping=1e-4` and
`rank_lr_correction_exponent=0.175`, now internal) but not its update rule. This one is built to
match every documented property: a momentum EMA of each factor's gradient (`beta1`), whitened by
the damped Gram matrix of the other factor (the "row and column preconditioner": `A·Aᵀ` spans the
adapted weight's rows, `Bᵀ·B` its columns), turned into an orthogonal direction by Newton–Schulz
(a fixed iteration count and normalization epsilon), and applied so that each factor moves the
adapted weight `scale·B·A` along a direction of Frobenius norm sqrt(rank) times the learning rate,
corrected by `(32/rank)**0.175` for every LoRA matrix alike. The tangent-space geometry is that of
LoRA-Muon (Cesista, Simal, Crowson, Biderman 2026, arXiv:2606.12921). With `A` r×n, `B` m×r,
momenta `Mᴬ`, `Mᴮ` and `msign(X) = U·Vᵀ` (SVD `X = U·Σ·Vᵀ`):

    Pᴬ = (A·Aᵀ + δI)^-½          Pᴮ = (Bᵀ·B + δI)^-½            (r×r; δ = DAMPING)
    A -= η/scale · Pᴮ·msign(Pᴮ·Mᴬ)      B -= η/scale · msign(Mᴮ·Pᴬ)·Pᴬ
    η  = learning_rate · (32/rank)**0.175

so `scale·B·ΔA ≈ -η·Q_B·msign(Q_Bᵀ·G)` with `Q_B` B's orthonormal column basis and `G` the gradient
of the adapted weight: every singular value of each factor's contribution is η. LoRA has no
non-matrix trainable tensors here (bias="none"), so Dimuon takes (A, B) pairs and nothing else.

    >>> opt = make_optimizer("dimuon", [(lora_a, lora_b)], LoraSpec(rank=8, optimizer="dimuon"))
    >>> set_hyperparameters(opt, DimuonParams(learning_rate=2e-2))
    >>> loss.backward(); opt.step(); opt.zero_grad()

Tensor-parallel shards (Megatron) pass `reducers`: for a factor split over ranks along its long
side, a function that sums a tensor over those ranks; every r×r Gram matrix and norm is then the
whole matrix's, and the update of each shard is that shard of the whole update.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .backends import AdamParams, DimuonParams, LoraSpec, UserInputError

Reduce = Callable[[torch.Tensor], torch.Tensor]

# Internal constants (Tinker: "matrix-sign iteration count and normalization epsilon are internal").
# Five steps of Keller Jordan's quintic (fast growth of small singular values), then cubic
# Newton–Schulz steps (3/2, -1/2), which converge to exactly 1: singular values end within ~1e-3 of 1.
NS_QUINTIC = (3.4445, -4.7750, 2.0315)
NS_QUINTIC_STEPS = 5
NS_CUBIC_STEPS = 4
NS_EPS = 1e-7
DAMPING = 1e-4  # Tinker's documented default
RANK_LR_EXPONENT = 0.175  # Tinker's documented default, relative to REFERENCE_RANK
REFERENCE_RANK = 32

# The per-parameter state each optimizer keeps (what checkpoints save next to the weights).
STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "dimuon": ("momentum_buffer",)}
PARAMS_FIELD = {"adamw": "adam_params", "dimuon": "optimizer_params"}  # where a step's params travel


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def msign_rows(x: torch.Tensor, reduce: Reduce = _whole) -> torch.Tensor:
    """U·Vᵀ of `x` (r×n, r the short side) by Newton–Schulz, in fp32; zero stays zero.

    Only r×r Gram matrices are formed, summed by `reduce` when `x` is one shard of columns.
    """
    x = x.float()
    gram = reduce(x @ x.T)
    x = x / (gram.trace().clamp_min(0).sqrt() + NS_EPS)  # Frobenius norm 1: every singular value <= 1
    a, b, c = NS_QUINTIC
    for step in range(NS_QUINTIC_STEPS + NS_CUBIC_STEPS):
        gram = reduce(x @ x.T)
        if step < NS_QUINTIC_STEPS:
            x = (a * torch.eye(len(gram), device=x.device) + b * gram + c * gram @ gram) @ x
        else:
            x = (1.5 * torch.eye(len(gram), device=x.device) - 0.5 * gram) @ x
    return x


def damped_inverse_sqrt(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """(gram + damping·I)^-½ for a symmetric positive semi-definite r×r matrix (eigh in fp64)."""
    values, vectors = torch.linalg.eigh(gram.double())
    return ((vectors * (values.clamp_min(0) + damping).rsqrt()) @ vectors.T).float()


def rank_lr_factor(rank: int) -> float:
    return (REFERENCE_RANK / rank) ** RANK_LR_EXPONENT


class Dimuon(torch.optim.Optimizer):
    """Dimuon over LoRA (A, B) pairs of one adapter; see the module docstring for the update.

    One param group per pair (`lr`, `beta1`); state `momentum_buffer` per tensor, saved and
    restored like AdamW's moments. `reducers` maps a sharded tensor to its sum-over-shards.
    """

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float, rank: int,
                 reducers: dict[torch.Tensor, Reduce] | None = None):
        for a, b in pairs:
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise ValueError(f"Dimuon takes LoRA pairs A [{rank}, n], B [m, {rank}]; got "
                                 f"{tuple(a.shape)} and {tuple(b.shape)}")
        super().__init__([{"params": [a, b]} for a, b in pairs], {"lr": 0.0, "beta1": 0.9})
        self.scale, self.rank = scale, rank
        self._reducers = {id(t): f for t, f in (reducers or {}).items()}

    def _reduce(self, t: torch.Tensor) -> Reduce:
        return self._reducers.get(id(t), _whole)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            a, b = group["params"]
            momenta = []
            for p in (a, b):
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))  # as AdamW: p's dtype
                buf.mul_(group["beta1"]).add_(grad, alpha=1 - group["beta1"])
                momenta.append(buf.float())
            reduce_a, reduce_b = self._reduce(a), self._reduce(b)
            af, bf = a.float(), b.float()
            row = damped_inverse_sqrt(reduce_a(af @ af.T))  # Pᴬ: A's rows span the adapted weight's rows
            col = damped_inverse_sqrt(reduce_b(bf.T @ bf))  # Pᴮ: B's columns span its columns
            step_a = col @ msign_rows(col @ momenta[0], reduce_a)
            step_b = msign_rows((momenta[1] @ row).T, reduce_b).T @ row
            size = group["lr"] * rank_lr_factor(self.rank) / self.scale
            a.sub_((size * step_a).to(a.dtype))
            b.sub_((size * step_b).to(b.dtype))
        return loss


def make_optimizer(kind: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], spec: LoraSpec,
                   reducers: dict[torch.Tensor, Reduce] | None = None) -> torch.optim.Optimizer:
    """A fresh optimizer of `kind` over an adapter's (A, B) pairs (hyperparameters are set per step)."""
    if kind == "dimuon":
        return Dimuon(pairs, spec.scale, spec.rank, reducers)
    if kind == "adamw":
        return torch.optim.AdamW([t for pair in pairs for t in pair], lr=0.0, weight_decay=0.0)
    raise UserInputError(f"optimizer {kind!r} is not supported", "optimizer_config.type")


def optimizer_config(kind: str) -> dict[str, object]:
    """The SDK's OptimizerConfig for `kind` (get_info's `optimizer_config`)."""
    return {"type": kind, "version": 1} if kind == "dimuon" else {"type": kind}


def check_optim_params(kind: str, params: AdamParams | DimuonParams, model_id: str = "") -> None:
    """Raise `UserInputError` naming the field unless `params` suit an optimizer of `kind`.

    Tinker fixes the optimizer when the model is created; a step must send its family's params.
    """
    sent = "dimuon" if isinstance(params, DimuonParams) else "adamw"
    if sent != kind:
        wanted = "types.DimuonParams" if kind == "dimuon" else "types.AdamParams"
        raise UserInputError(
            f"model {model_id!r} was created with the {kind} optimizer, which is fixed for its lifetime (as in "
            f"Tinker); send {wanted}, or create a model with the optimizer you want", PARAMS_FIELD[sent])
    field = PARAMS_FIELD[kind]
    for name, value in params.__dict__.items():
        if not math.isfinite(value):
            raise UserInputError(f"{name} must be a finite number", f"{field}.{name}")
    if params.learning_rate < 0:
        raise UserInputError("learning_rate must be >= 0", f"{field}.learning_rate")
    if not 0 <= params.beta1 < 1:
        raise UserInputError("beta1 must be in [0, 1)", f"{field}.beta1")
    if isinstance(params, AdamParams):
        for name in ("eps", "weight_decay", "grad_clip_norm"):
            if getattr(params, name) < 0:
                raise UserInputError(f"{name} must be >= 0", f"{field}.{name}")
        if not 0 <= params.beta2 < 1:
            raise UserInputError("beta2 must be in [0, 1)", f"{field}.beta2")


def set_hyperparameters(optimizer: torch.optim.Optimizer, params: AdamParams | DimuonParams) -> None:
    """This step's hyperparameters (Tinker sends them with every step; nothing carries over)."""
    for group in optimizer.param_groups:
        if isinstance(params, DimuonParams):
            group.update(lr=params.learning_rate, beta1=params.beta1)
        else:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                         weight_decay=params.weight_decay)


# ----------------------------------------------------------------------------- what a checkpoint folder holds


def checkpoint_optimizer(directory: Path) -> str:
    """The optimizer a checkpoint's state is for: `tink_state.json`'s `lora_spec.optimizer` (adamw if absent)."""
    meta = Path(directory) / "tink_state.json"
    state = json.loads(meta.read_text()) if meta.is_file() else {}
    return str((state.get("lora_spec") or {}).get("optimizer", "adamw"))


def check_loadable_state(directory: Path, kind: str, with_optimizer: bool) -> None:
    """Raise `UserInputError` (field `path`) when asked to restore state of another optimizer than `kind`."""
    saved = checkpoint_optimizer(directory)
    if with_optimizer and saved != kind:
        raise UserInputError(f"{directory} holds {saved} optimizer state but this model uses {kind}; load it "
                             "without the optimizer state, or create a model from it "
                             "(create_training_client_from_state_with_optimizer)", "path")


def checkpoint_lora_scale(directory: Path, default: float) -> float:
    """The scale the folder's B·A was trained under (adapter_config.json: lora_alpha / r, or / sqrt(r)
    with rslora); `default` when the folder does not say."""
    path = Path(directory) / "adapter_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if not config.get("r") or config.get("lora_alpha") is None:
        return default
    return float(config["lora_alpha"]) / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def rescale_state(state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """A factor's optimizer state after the factor itself is multiplied by `factor` (its gradient is
    divided by it): first moments / factor, second moments / factor², counters unchanged."""
    power = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2}
    return {k: v / factor ** power[k] if k in power else v for k, v in state.items()}
