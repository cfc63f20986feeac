"""The Tinker built-in losses, one datum at a time, as torch functions of the target log-probabilities.

Every loss is a *sum* over the datum's tokens (never a mean), so the trainer sums datums and a
batch's `loss:sum` is comparable with Tinker's. Formulas, input names and `loss_fn_config` keys
follow the Tinker docs (tinker-docs.thinkingmachines.ai/tinker/losses/*) and the tinker 0.38.0
SDK; where the docs are silent the choice is stated on the function. Notation: `lp` = current
policy log p(x_t) (carries grad), `q` = sampler log q(x_t) (input `logprobs`), `A` = `advantages`,
`r = exp(lp - q)`, `sg` = stop-gradient.

    >>> import torch
    >>> lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    >>> out = compute_loss("cross_entropy", lp, {"target_tokens": torch.tensor([3, 4]),
    ...                                          "weights": torch.tensor([1.0, 0.5])}, None)
    >>> out.loss.item(), out.elementwise.tolist()
    (2.0, [1.0, 1.0])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .backends import UserInputError
from .tensors import to_device

Inputs = Mapping[str, torch.Tensor | np.ndarray]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar; the trainer sums it over datums and calls backward()
    elementwise: torch.Tensor | None  # per-token loss, same shape as target_tokens; sums to `loss`
    metrics: dict[str, float] = field(default_factory=dict)  # per-datum, summed over the batch


_RL = frozenset({"target_tokens", "logprobs", "advantages"})
_THRESHOLDS = frozenset({"clip_low_threshold", "clip_high_threshold"})
_REQUIRED: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset({"target_tokens", "weights"}),
    "importance_sampling": _RL,
    "ppo": _RL,
    "cispo": _RL,
    "dro": _RL,
    "gspo": _RL,
    "stable_reinforce": _RL,
}
# Tinker rejects keys a loss does not read (the cookbook strips its own `mask` key for that reason).
_OPTIONAL: dict[str, frozenset[str]] = {
    "ppo": _THRESHOLDS,
    "cispo": _THRESHOLDS,
    "gspo": _THRESHOLDS | {"sequence_ratio_mask"},
}
# `loss_fn_config` defaults. PPO 0.8/1.2 and CISPO's one-sided 0/4 are Tinker's documented
# defaults; DRO's beta 0.05 is the value the cookbook once documented; GSPO's are the paper's
# (eps_low=3e-4, eps_high=4e-4) because Tinker does not publish its own; stable_reinforce's are ours.
CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
    "gspo": {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4},
    "stable_reinforce": {"clip_high_threshold": 2.0, "kl_coeff": 0.0},
}
LOSS_FUNCTIONS: frozenset[str] = frozenset(_REQUIRED)


def required_inputs(loss_fn: str) -> set[str]:
    """The `loss_fn_inputs` keys every datum must carry for `loss_fn` (KeyError if unknown)."""
    return set(_REQUIRED[loss_fn])


def resolved_config(loss_fn: str, config: Mapping[str, float | str] | None) -> dict[str, float]:
    """`config` over the loss's defaults; assumes `validate_inputs` accepted it."""
    return {**CONFIG_DEFAULTS[loss_fn], **{k: float(v) for k, v in (config or {}).items()}}


def validate_inputs(
    loss_fn: str,
    inputs: Mapping[str, np.ndarray],
    num_tokens: int,
    datum_index: int,
    config: Mapping[str, float | str] | None,
) -> None:
    """Raise `UserInputError` naming the field unless `compute_loss` can run on this datum.

    Guarantees on return: every required key is present, no unknown key is, every array has
    `num_tokens` rows (1-D, except cross_entropy's `target_tokens`/`weights` which may be
    [num_tokens, K] with equal shapes), all values are finite, `target_tokens` are non-negative
    integers (the vocabulary bound is the trainer's to check), and the config is well-formed.
    """
    if loss_fn not in LOSS_FUNCTIONS:
        raise UserInputError(f"unknown loss_fn {loss_fn!r}; supported: {sorted(LOSS_FUNCTIONS)}", "loss_fn")
    _validate_config(loss_fn, config)
    prefix = f"data[{datum_index}].loss_fn_inputs"
    allowed = _REQUIRED[loss_fn] | _OPTIONAL.get(loss_fn, frozenset())
    for name in sorted(_REQUIRED[loss_fn] - inputs.keys()):
        raise UserInputError(f"loss_fn {loss_fn!r} needs loss_fn_inputs[{name!r}]", f"{prefix}.{name}")
    for name in sorted(inputs.keys() - allowed):
        raise UserInputError(
            f"loss_fn {loss_fn!r} does not take loss_fn_inputs[{name!r}]; it takes {sorted(allowed)}",
            f"{prefix}.{name}",
        )
    for name, value in inputs.items():
        arr = np.asarray(value)
        where = f"{prefix}.{name}"
        two_d = loss_fn == "cross_entropy" and arr.ndim == 2
        if arr.ndim == 0 or arr.shape[0] != num_tokens or (arr.ndim > 1 and not two_d):
            raise UserInputError(
                f"{name} must have shape ({num_tokens},) to match model_input's {num_tokens} tokens, "
                f"got {arr.shape}",
                where,
            )
        if arr.dtype.kind not in "biuf":
            raise UserInputError(f"{name} must be numeric, got dtype {arr.dtype}", where)
        if not np.isfinite(arr).all():
            raise UserInputError(f"{name} must be finite (no NaN or inf)", where)
        if name == "target_tokens" and ((arr < 0).any() or (arr != np.round(arr)).any()):
            raise UserInputError("target_tokens must be non-negative integer token ids", where)
        if name in _THRESHOLDS and (arr < 0).any():
            raise UserInputError(f"{name} must be >= 0", where)
    if loss_fn == "cross_entropy" and np.shape(inputs["weights"]) != np.shape(inputs["target_tokens"]):
        raise UserInputError(
            f"weights shape {np.shape(inputs['weights'])} must equal target_tokens shape "
            f"{np.shape(inputs['target_tokens'])}",
            f"{prefix}.weights",
        )


def _validate_config(loss_fn: str, config: Mapping[str, float | str] | None) -> None:
    defaults = CONFIG_DEFAULTS[loss_fn]
    for key, value in (config or {}).items():
        where = f"loss_fn_config.{key}"
        if key not in defaults:
            takes = f"takes {sorted(defaults)}" if defaults else "takes no loss_fn_config"
            raise UserInputError(f"loss_fn {loss_fn!r} {takes}; got {key!r}", where)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserInputError(f"{key} must be a finite number, got {value!r}", where)
        if value < 0:
            raise UserInputError(f"{key} must be >= 0, got {value}", where)
    cfg = resolved_config(loss_fn, config)
    if cfg.get("clip_high_threshold", 1.0) <= 0:
        raise UserInputError("clip_high_threshold must be > 0", "loss_fn_config.clip_high_threshold")
    if cfg.get("clip_low_threshold", 0.0) > cfg.get("clip_high_threshold", math.inf):
        raise UserInputError(
            f"clip_low_threshold {cfg['clip_low_threshold']} exceeds clip_high_threshold "
            f"{cfg['clip_high_threshold']}",
            "loss_fn_config.clip_low_threshold",
        )


def compute_loss(
    loss_fn: str,
    target_logprobs: torch.Tensor,
    inputs: Inputs,
    config: Mapping[str, float | str] | None,
) -> LossOutput:
    """The loss of one datum whose inputs passed `validate_inputs`.

    `target_logprobs` has `target_tokens`' shape; `inputs` may be tensors or numpy arrays (they
    are moved to `target_logprobs`' device and float dtype). `loss == elementwise.sum()`.
    """
    if loss_fn not in LOSS_FUNCTIONS:
        raise UserInputError(f"unknown loss_fn {loss_fn!r}; supported: {sorted(LOSS_FUNCTIONS)}", "loss_fn")
    lp = target_logprobs
    x = {
        k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).to(
            device=lp.device, dtype=lp.dtype
        )
        for k, v in inputs.items()
        if k != "target_tokens"
    }
    elementwise = _LOSSES[loss_fn](lp, x, resolved_config(loss_fn, config))
    return LossOutput(loss=elementwise.sum(), elementwise=elementwise, metrics={})


def _thresholds(
    lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]
) -> tuple[torch.Tensor, ...]:
    """Per-token `clip_*_threshold` inputs win over `loss_fn_config` (the SDK lets a datum carry them)."""
    return tuple(
        x[k] if k in x else lp.new_tensor(cfg[k]) for k in ("clip_low_threshold", "clip_high_threshold")
    )


def _cross_entropy(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    """-lp * weights. Exactly linear in lp: `forward_backward_custom` sends weights = -dC/dlp."""
    return -lp * x["weights"]


def _importance_sampling(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    """-r * A: REINFORCE corrected for the sampler/learner mismatch; d/dlp = -r * A."""
    return -torch.exp(lp - x["logprobs"]) * x["advantages"]


def _ppo(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    """-min(r * A, clip(r, low, high) * A), token-wise; low/high are ratio bounds, not epsilons."""
    ratio = torch.exp(lp - x["logprobs"])
    low, high = _thresholds(lp, x, cfg)
    adv = x["advantages"]
    return -torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv)


def _cispo(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    """-sg(clip(r, low, high)) * lp * A: clipping bounds each token's weight, never zeros its gradient."""
    low, high = _thresholds(lp, x, cfg)
    weight = torch.clamp(torch.exp(lp - x["logprobs"]), low, high).detach()
    return -weight * lp * x["advantages"]


def _dro(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    """-(lp * A - beta/2 * (lp - q)^2), per token as in Tinker's implementation (not per sequence)."""
    return -(lp * x["advantages"] - 0.5 * cfg["beta"] * (lp - x["logprobs"]) ** 2)


def _sampled_tokens(x: dict[str, torch.Tensor], key: str | None) -> torch.Tensor:
    """Which tokens were sampled: `key`'s non-zeros if given, else tokens with a non-zero advantage.

    The fallback follows the cookbook's convention that prompt positions carry advantage 0 (and
    sampler logprob 0, so counting them would wreck any ratio).
    """
    return (x[key] != 0) if key is not None and key in x else (x["advantages"] != 0)


def _gspo(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    """GSPO-token (Zheng et al. 2025), as Tinker documents it.

    s = exp(mean over masked tokens of sg(lp) - q); each token's ratio has s's value and grad
    s * dlp_t; loss_t = -min(s_t * A_t, clip(s_t, low, high) * A_t). So one off-ratio token can
    clip (zero the gradient of) every token of its sequence. Without `sequence_ratio_mask` the mask
    is the tokens with non-zero advantage; an empty mask gives s = 1.
    """
    mask = _sampled_tokens(x, "sequence_ratio_mask")
    log_ratio = (lp.detach() - x["logprobs"])[mask]
    seq_log_ratio = log_ratio.mean() if log_ratio.numel() else lp.new_zeros(())
    ratio = torch.exp(seq_log_ratio + lp - lp.detach())
    low, high = _thresholds(lp, x, cfg)
    adv = x["advantages"]
    return -torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv)


def _stable_reinforce(lp: torch.Tensor, x: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    """Tink's StableReinforce: truncated-IS REINFORCE plus an optional KL pull toward the sampler.

    Tinker's own objective reads sampler state it records server-side (`record_stability_info`,
    provenance spans) and is unpublished, so this is our choice, built from published parts:
    loss_t = -sg(min(r_t, C)) * A_t * lp_t + kl_coeff * m_t * (r_t - 1 - log r_t),
    C = clip_high_threshold. The detached, truncated weight (truncated importance sampling, as
    used against sampler/trainer mismatch) keeps the gradient bounded however stale the sample;
    the k3 estimator of KL(q || p) is >= 0, zero on-policy, with gradient kl_coeff * (r_t - 1).
    m_t marks tokens with non-zero advantage, so prompt positions add no KL.
    """
    log_ratio = lp - x["logprobs"]
    weight = torch.clamp(torch.exp(log_ratio), max=cfg["clip_high_threshold"]).detach()
    # Mask before exp: a masked-out inf would still turn the gradient into 0 * inf = NaN.
    masked = torch.where(_sampled_tokens(x, None), log_ratio, torch.zeros_like(log_ratio))
    return -weight * x["advantages"] * lp + cfg["kl_coeff"] * (torch.exp(masked) - 1 - masked)


_LOSSES: dict[str, Callable[[torch.Tensor, dict[str, torch.Tensor], dict[str, float]], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _importance_sampling,
    "ppo": _ppo,
    "cispo": _cispo,
    "dro": _dro,
    "gspo": _gspo,
    "stable_reinforce": _stable_reinforce,
}


def microbatch_loss(
    loss_fn: str,
    logprobs: Iterable[torch.Tensor],
    data: Sequence[Any],
    config: Mapping[str, float | str] | None,
    metrics: dict[str, float],
) -> tuple[torch.Tensor | None, list[dict[str, np.ndarray]]]:
    """The summed loss of a micro-batch (None if empty) and each datum's outputs for the client.

    `logprobs` holds each datum's target logprobs; `data` the datums (`loss_fn_inputs`). The batch's
    loss is added to `metrics["loss:sum"]`. Every trainer engine scores its micro-batches with this.
    Token-wise losses run once over the micro-batch's tokens laid end to end, and all its outputs come
    to the host in one copy: per datum, small kernels and a wait for the GPU each would starve it.
    """
    logprobs = list(logprobs)
    if not logprobs:
        return None, []
    inputs = [datum.loss_fn_inputs for datum in data]
    lp = torch.cat(logprobs)
    if _joinable(loss_fn, logprobs, inputs):
        elementwise = compute_loss(loss_fn, lp, _joined_inputs(inputs, lp.device), config).elementwise
    else:  # one datum at a time, e.g. GSPO, whose tokens share their sequence's ratio
        elementwise = torch.cat([compute_loss(loss_fn, one, x, config).elementwise for one, x in zip(logprobs, inputs)])
    total = elementwise.sum()
    flat = (lp.detach().float().flatten(), elementwise.detach().float().flatten(), total.detach().float().reshape(1))
    host = torch.cat(flat).cpu().numpy()
    sizes = [one.numel() for one in logprobs]
    lp_host, elementwise_host = np.split(host[:-1], 2)
    offsets = np.cumsum(sizes)[:-1]
    outputs = [{"logprobs": a.reshape(one.shape), "elementwise_loss": b.reshape(one.shape)}
               for one, a, b in zip(logprobs, np.split(lp_host, offsets), np.split(elementwise_host, offsets))]
    metrics["loss:sum"] = metrics.get("loss:sum", 0.0) + float(host[-1])
    return total, outputs


SEQUENCE_LEVEL = frozenset({"gspo"})  # a token's loss depends on its whole sequence


def _joinable(loss_fn: str, logprobs: list[torch.Tensor], inputs: list[Mapping[str, Any]]) -> bool:
    """Whether the datums' tokens can be scored as one sequence: a token-wise loss, alike shapes and inputs."""
    return (loss_fn not in SEQUENCE_LEVEL and len({lp.shape[1:] for lp in logprobs}) == 1
            and len({frozenset(x) for x in inputs}) == 1)


def _joined_inputs(inputs: list[Mapping[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    """Each loss input of the datums end to end, on `device` in one copy per input."""
    joined = {}
    for key in inputs[0]:
        if key == "target_tokens":
            continue
        host = torch.from_numpy(np.concatenate([np.asarray(x[key]) for x in inputs]))
        joined[key] = to_device(host, device)
    return joined
