"""Each Tinker loss against a hand computation: value, per-token loss and d loss / d target_logprobs.

Expected numbers come from the written formulas (with `math`), never from the module under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src.backends import UserInputError
from src.losses import LOSS_FUNCTIONS, compute_loss, required_inputs, validate_inputs

E = math.exp


def run(loss_fn, lp, config=None, **inputs):
    """(loss, grad, elementwise) of one datum whose current log-probs are `lp`."""
    lp_t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    n = len(lp)
    tensors = {"target_tokens": torch.arange(n)}
    tensors.update({k: torch.tensor(v, dtype=torch.float64) for k, v in inputs.items()})
    out = compute_loss(loss_fn, lp_t, tensors, config)
    out.loss.backward()
    assert out.elementwise is not None
    assert out.loss.item() == pytest.approx(out.elementwise.sum().item(), abs=1e-12)
    return out.loss.item(), lp_t.grad.tolist(), out.elementwise.tolist()


def close(actual, expected):
    assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------- values and gradients


def test_cross_entropy_is_linear_in_logprobs():
    # Negative weights are legal: forward_backward_custom sends weights = -dC/dlogprobs.
    loss, grad, elem = run("cross_entropy", [-1.0, -2.0, -0.5], weights=[0.0, 1.0, -2.0])
    close(loss, 0 + 2.0 - 1.0)
    close(elem, [0.0, 2.0, -1.0])
    close(grad, [0.0, -1.0, 2.0])  # = -weights, whatever their sign


def test_cross_entropy_accepts_k_targets_per_position():
    lp = torch.tensor([[-1.0, -3.0], [-2.0, -0.5]], requires_grad=True)
    w = np.array([[0.5, 0.5], [1.0, 0.0]], dtype=np.float32)
    out = compute_loss("cross_entropy", lp, {"target_tokens": np.array([[1, 2], [3, 4]]), "weights": w}, None)
    out.loss.backward()
    close(out.loss.item(), 0.5 + 1.5 + 2.0)
    close(lp.grad.flatten().tolist(), [-0.5, -0.5, -1.0, 0.0])


def test_importance_sampling():
    loss, grad, elem = run("importance_sampling", [-1.0, -0.5], logprobs=[-1.2, -0.5], advantages=[2.0, -1.0])
    close(elem, [-2 * E(0.2), 1.0])
    close(loss, -2 * E(0.2) + 1.0)
    close(grad, [-2 * E(0.2), 1.0])  # d(-r A)/dlp = -r A


# Log-ratios chosen to land in each PPO region with the default bounds 0.8 / 1.2.
PPO_Q = [-1.0] * 5
PPO_LOG_RATIO = [0.5, 0.5, -0.5, -0.5, 0.1]
PPO_ADV = [1.0, -1.0, 1.0, -1.0, 2.0]
PPO_LP = [q + d for q, d in zip(PPO_Q, PPO_LOG_RATIO)]


def test_ppo_clipping_regions_with_default_thresholds():
    loss, grad, elem = run("ppo", PPO_LP, logprobs=PPO_Q, advantages=PPO_ADV)
    hi, lo, mid = E(0.5), E(-0.5), E(0.1)
    expected = [
        -1.2,  # r > 1.2, A > 0: clipped, no gradient
        hi,  # r > 1.2, A < 0: the unclipped (pessimistic) term wins
        -lo,  # r < 0.8, A > 0: unclipped
        0.8,  # r < 0.8, A < 0: clipped, no gradient
        -2 * mid,  # inside the band
    ]
    close(elem, expected)
    close(loss, sum(expected))
    close(grad, [0.0, hi, -lo, 0.0, -2 * mid])


def test_ppo_config_thresholds_and_per_token_override():
    cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}
    _, grad, elem = run("ppo", [-0.9], cfg, logprobs=[-1.0], advantages=[2.0])
    close(elem, [-2 * 1.05])  # r = e^0.1 = 1.105 > 1.05: clipped
    close(grad, [0.0])
    # A per-token threshold input takes precedence over loss_fn_config.
    _, grad, _ = run("ppo", [-0.9], cfg, logprobs=[-1.0], advantages=[2.0], clip_high_threshold=[1.2])
    close(grad, [-2 * E(0.1)])


def test_cispo_one_sided_default_and_weight_never_zero():
    lp = [-1.0, -4.0, -0.8]
    q = [-3.0, -1.0, -1.0]  # log-ratios 2, -3, 0.2
    adv = [1.0, -1.0, 0.5]
    loss, grad, elem = run("cispo", lp, logprobs=q, advantages=adv)
    w = [4.0, E(-3.0), E(0.2)]  # default clip (0, 4): only the upper side bites
    close(elem, [-wi * li * ai for wi, li, ai in zip(w, lp, adv)])
    close(grad, [-wi * ai for wi, ai in zip(w, adv)])  # the weight is detached
    _, grad, _ = run(
        "cispo", lp, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, logprobs=q, advantages=adv
    )
    close(grad, [-1.2, 0.8, -1.2 * 0.5])  # clipped tokens keep a gradient, unlike PPO


def test_dro_quadratic_penalty():
    lp, q, adv = [-1.0, -2.0], [-1.5, -2.0], [1.0, -2.0]
    loss, grad, elem = run("dro", lp, logprobs=q, advantages=adv)
    beta = 0.05
    close(elem, [-(-1.0 * 1.0 - 0.5 * beta * 0.25), -(-2.0 * -2.0)])
    close(grad, [-(1.0 - beta * 0.5), 2.0])  # -(A - beta (lp - q))
    _, grad, _ = run("dro", lp, {"beta": 1.0}, logprobs=q, advantages=adv)
    close(grad, [-(1.0 - 0.5), 2.0])


# A prompt token (advantage 0, sampler logprob 0), then three sampled tokens whose
# log-ratios 0.1, -0.1, 0.3 average to 0.1: the sequence ratio is s = e^0.1 = 1.105.
GSPO_Q = [0.0, -1.0, -1.0, -1.0]
GSPO_LP = [-3.0, -0.9, -1.1, -0.7]
S = E(0.1)


def test_gspo_sequence_ratio_inside_band():
    loss, grad, elem = run(
        "gspo",
        GSPO_LP,
        {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0},
        logprobs=GSPO_Q,
        advantages=[0.0, 1.0, 1.0, 1.0],
    )
    close(elem, [0.0, -S, -S, -S])  # every sampled token carries s's value, not its own ratio
    close(grad, [0.0, -S, -S, -S])  # ... and the gradient s * d lp_t


def test_gspo_clips_whole_sequences():
    cfg = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.05}
    adv = [0.0, 1.0, 1.0, 1.0]
    loss, grad, _ = run("gspo", GSPO_LP, cfg, logprobs=GSPO_Q, advantages=adv)
    close(loss, -3 * 1.05)
    close(grad, [0.0, 0.0, 0.0, 0.0])  # s > 1.05 drops the whole sequence ...
    _, ppo_grad, _ = run("ppo", GSPO_LP, cfg, logprobs=GSPO_Q, advantages=adv)
    assert ppo_grad[2] == pytest.approx(-E(-0.1))  # ... where token-wise PPO keeps token 2
    # With negative advantages the unclipped term wins: every token gets +s.
    _, grad, _ = run("gspo", GSPO_LP, cfg, logprobs=GSPO_Q, advantages=[0.0, -1.0, -1.0, -1.0])
    close(grad, [0.0, S, S, S])


def test_gspo_default_thresholds_are_the_papers():
    loss, grad, _ = run("gspo", GSPO_LP, logprobs=GSPO_Q, advantages=[0.0, 1.0, 1.0, 1.0])
    close(loss, -3 * (1 + 4e-4))
    close(grad, [0.0] * 4)


def test_gspo_sequence_ratio_mask_selects_tokens():
    # Only tokens 1 and 2 define the ratio: mean(0.1, -0.1) = 0, s = 1, inside the default band.
    loss, grad, _ = run(
        "gspo",
        GSPO_LP,
        logprobs=GSPO_Q,
        advantages=[0.0, 1.0, 1.0, 1.0],
        sequence_ratio_mask=[0.0, 1.0, 1.0, 0.0],
    )
    close(loss, -3.0)
    close(grad, [0.0, -1.0, -1.0, -1.0])


def test_gspo_all_zero_advantages_is_finite():
    loss, grad, _ = run("gspo", GSPO_LP, logprobs=GSPO_Q, advantages=[0.0] * 4)
    close(loss, 0.0)
    close(grad, [0.0] * 4)


def test_stable_reinforce_truncates_and_penalises_kl():
    lp = [-4.0, 0.0, -1.5]
    q = [0.0, -1.0, -1.0]  # prompt token, then log-ratios 1.0 and -0.5
    adv = [0.0, 1.0, -1.0]
    w1, w2 = 2.0, E(-0.5)  # e^1 = 2.72 truncated at the default C = 2
    loss, grad, _ = run("stable_reinforce", lp, logprobs=q, advantages=adv)
    close(loss, -w1 * 1.0 * 0.0 - w2 * (-1.0) * (-1.5))
    close(grad, [0.0, -w1, w2])
    loss, grad, _ = run("stable_reinforce", lp, {"kl_coeff": 0.1}, logprobs=q, advantages=adv)
    kl = (E(1.0) - 1 - 1.0) + (E(-0.5) - 1 + 0.5)  # k3 on sampled tokens only
    close(loss, -w2 * 1.5 + 0.1 * kl)
    close(grad, [0.0, -w1 + 0.1 * (E(1.0) - 1), w2 + 0.1 * (E(-0.5) - 1)])


def test_stable_reinforce_masked_prompt_overflow_keeps_gradient_finite():
    # A prompt position whose log-ratio would overflow exp() must not poison the gradient.
    _, grad, _ = run(
        "stable_reinforce", [-1.0, -1.0], {"kl_coeff": 1.0}, logprobs=[-1000.0, -1.0], advantages=[0.0, 1.0]
    )
    assert all(math.isfinite(g) for g in grad)


def test_compute_loss_takes_numpy_inputs_in_float32():
    lp = torch.tensor([-1.0, -0.5], requires_grad=True)
    inputs = {
        "target_tokens": np.array([1, 2]),
        "logprobs": np.array([-1.0, -0.5], dtype=np.float32),
        "advantages": np.array([1.0, 1.0]),
    }
    out = compute_loss("ppo", lp, inputs, None)
    assert out.loss.dtype == torch.float32
    close(out.loss.item(), -2.0)


# ------------------------------------------------------------------------- validation


def valid_inputs(loss_fn: str, n: int = 3) -> dict[str, np.ndarray]:
    inputs = {"target_tokens": np.arange(n, dtype=np.int64)}
    for name in required_inputs(loss_fn) - {"target_tokens"}:
        inputs[name] = np.full(n, -0.5 if name == "logprobs" else 1.0, dtype=np.float32)
    return inputs


@pytest.mark.parametrize("loss_fn", sorted(LOSS_FUNCTIONS))
def test_valid_inputs_pass(loss_fn):
    validate_inputs(loss_fn, valid_inputs(loss_fn), 3, 0, None)


def test_required_inputs():
    assert required_inputs("cross_entropy") == {"target_tokens", "weights"}
    assert required_inputs("gspo") == {"target_tokens", "logprobs", "advantages"}


def rejects(field: str, loss_fn: str, inputs, config=None, n: int = 3, index: int = 2) -> str:
    with pytest.raises(UserInputError) as info:
        validate_inputs(loss_fn, inputs, n, index, config)
    assert info.value.field == field
    return str(info.value)


def test_rejects_unknown_loss_fn():
    assert "supported" in rejects("loss_fn", "dpo", valid_inputs("ppo"))


def test_rejects_missing_input():
    inputs = valid_inputs("cross_entropy")
    del inputs["weights"]
    rejects("data[2].loss_fn_inputs.weights", "cross_entropy", inputs)


def test_rejects_input_the_loss_does_not_take():
    inputs = valid_inputs("importance_sampling") | {"mask": np.ones(3, dtype=np.float32)}
    assert "mask" in rejects("data[2].loss_fn_inputs.mask", "importance_sampling", inputs)
    # clip thresholds are per-token inputs of ppo/cispo/gspo only.
    inputs = valid_inputs("importance_sampling") | {"clip_low_threshold": np.ones(3, dtype=np.float32)}
    rejects("data[2].loss_fn_inputs.clip_low_threshold", "importance_sampling", inputs)


def test_rejects_wrong_length_and_rank():
    inputs = valid_inputs("ppo") | {"advantages": np.ones(2, dtype=np.float32)}
    assert "(3,)" in rejects("data[2].loss_fn_inputs.advantages", "ppo", inputs)
    inputs = valid_inputs("ppo") | {"advantages": np.ones((3, 2), dtype=np.float32)}
    rejects("data[2].loss_fn_inputs.advantages", "ppo", inputs)
    inputs = valid_inputs("ppo") | {"advantages": np.float32(1.0)}
    rejects("data[2].loss_fn_inputs.advantages", "ppo", inputs)


def test_cross_entropy_weights_must_match_2d_targets():
    inputs = {"target_tokens": np.zeros((3, 2), dtype=np.int64), "weights": np.ones((3, 2), dtype=np.float32)}
    validate_inputs("cross_entropy", inputs, 3, 0, None)
    inputs["weights"] = np.ones(3, dtype=np.float32)
    rejects("data[2].loss_fn_inputs.weights", "cross_entropy", inputs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_rejects_non_finite_values(bad):
    inputs = valid_inputs("cispo")
    inputs["logprobs"][1] = bad
    assert "finite" in rejects("data[2].loss_fn_inputs.logprobs", "cispo", inputs)


def test_rejects_non_numeric_input():
    inputs = valid_inputs("dro") | {"advantages": np.array(["a", "b", "c"])}
    assert "numeric" in rejects("data[2].loss_fn_inputs.advantages", "dro", inputs)


def test_rejects_bad_target_tokens():
    inputs = valid_inputs("cross_entropy") | {"target_tokens": np.array([0, -1, 2])}
    rejects("data[2].loss_fn_inputs.target_tokens", "cross_entropy", inputs)
    inputs = valid_inputs("cross_entropy") | {"target_tokens": np.array([0.0, 1.5, 2.0])}
    rejects("data[2].loss_fn_inputs.target_tokens", "cross_entropy", inputs)


def test_rejects_negative_per_token_threshold():
    inputs = valid_inputs("ppo") | {"clip_low_threshold": np.array([0.8, -0.1, 0.8], dtype=np.float32)}
    rejects("data[2].loss_fn_inputs.clip_low_threshold", "ppo", inputs)


@pytest.mark.parametrize(
    ("loss_fn", "config", "field"),
    [
        ("ppo", {"clip_ratio": 0.2}, "loss_fn_config.clip_ratio"),
        ("cross_entropy", {"beta": 0.1}, "loss_fn_config.beta"),
        ("importance_sampling", {"clip_high_threshold": 1.2}, "loss_fn_config.clip_high_threshold"),
        ("dro", {"beta": "big"}, "loss_fn_config.beta"),
        ("dro", {"beta": -0.1}, "loss_fn_config.beta"),
        ("dro", {"beta": math.nan}, "loss_fn_config.beta"),
        ("stable_reinforce", {"kl_coeff": True}, "loss_fn_config.kl_coeff"),
        ("ppo", {"clip_high_threshold": 0.0}, "loss_fn_config.clip_high_threshold"),
        ("ppo", {"clip_low_threshold": 1.3}, "loss_fn_config.clip_low_threshold"),  # above default high 1.2
    ],
)
def test_rejects_bad_config(loss_fn, config, field):
    rejects(field, loss_fn, valid_inputs(loss_fn), config)


def test_accepts_documented_configs():
    validate_inputs(
        "ppo", valid_inputs("ppo"), 3, 0, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.28}
    )
    validate_inputs("cispo", valid_inputs("cispo"), 3, 0, {"clip_low_threshold": 0, "clip_high_threshold": 4})
    validate_inputs("dro", valid_inputs("dro"), 3, 0, {"beta": 0.01})
    validate_inputs("stable_reinforce", valid_inputs("stable_reinforce"), 3, 0, {"kl_coeff": 0.1})
    inputs = valid_inputs("gspo") | {"sequence_ratio_mask": np.array([0, 1, 1], dtype=np.float32)}
    validate_inputs("gspo", inputs, 3, 0, None)


# ------------------------------------------------------------------------- micro-batches


def datum_inputs(loss_fn: str, n: int, rng: np.random.Generator, k: int | None = None) -> dict[str, np.ndarray]:
    shape = (n,) if k is None else (n, k)
    inputs = {"target_tokens": rng.integers(0, 50, shape)}
    for name in required_inputs(loss_fn) - {"target_tokens"}:
        inputs[name] = (rng.normal(-1.0, 0.3, shape) if name == "logprobs" else rng.normal(size=shape)).astype(np.float32)
    if loss_fn != "cross_entropy":
        inputs["advantages"][:2] = 0.0  # prompt positions, as the cookbook sends them
    return inputs


@pytest.mark.parametrize("loss_fn", sorted(LOSS_FUNCTIONS))
def test_microbatch_loss_equals_the_datums_one_by_one(loss_fn):
    """A micro-batch is scored in one pass over its tokens (per datum for GSPO): each datum's outputs and the
    gradient equal those of `compute_loss` on that datum alone, and `loss:sum` is their total."""
    from types import SimpleNamespace

    from src.losses import microbatch_loss

    rng = np.random.default_rng(1)
    data = [SimpleNamespace(loss_fn_inputs=datum_inputs(loss_fn, n, rng)) for n in (5, 9, 3)]
    if loss_fn in ("ppo", "cispo"):  # a per-token threshold on one datum only: their inputs differ
        data[1].loss_fn_inputs["clip_high_threshold"] = np.full(9, 1.1, np.float32)
    lps = [torch.tensor(rng.normal(-1.0, 0.3, len(d.loss_fn_inputs["target_tokens"])), dtype=torch.float32,
                        requires_grad=True)
           for d in data]
    metrics: dict[str, float] = {}
    total, outputs = microbatch_loss(loss_fn, lps, data, None, metrics)
    total.backward()
    grads = [lp.grad.clone() for lp in lps]
    expected_total = scale = 0.0
    for lp, d, out, grad in zip(lps, data, outputs, grads):
        alone = lp.detach().clone().requires_grad_(True)
        reference = compute_loss(loss_fn, alone, d.loss_fn_inputs, None)
        reference.loss.backward()
        np.testing.assert_allclose(out["elementwise_loss"], reference.elementwise.detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(out["logprobs"], lp.detach().numpy())
        torch.testing.assert_close(grad, alone.grad)
        expected_total += float(reference.loss.detach())
        scale += float(reference.elementwise.detach().abs().sum())
    assert metrics["loss:sum"] == pytest.approx(expected_total, abs=1e-6 * scale)  # fp32 sums, in other orders


def test_microbatch_loss_with_k_targets_per_position():
    from types import SimpleNamespace

    from src.losses import microbatch_loss

    rng = np.random.default_rng(2)
    data = [SimpleNamespace(loss_fn_inputs=datum_inputs("cross_entropy", n, rng, k=3)) for n in (4, 6)]
    lps = [torch.tensor(rng.normal(-1.0, 0.3, (n, 3)), dtype=torch.float32) for n in (4, 6)]
    total, outputs = microbatch_loss("cross_entropy", lps, data, None, {})
    assert [o["elementwise_loss"].shape for o in outputs] == [(4, 3), (6, 3)]
    for lp, d, out in zip(lps, data, outputs):
        expected = compute_loss("cross_entropy", lp, d.loss_fn_inputs, None).elementwise.numpy()
        np.testing.assert_allclose(out["elementwise_loss"], expected, rtol=1e-6)
    assert float(total) == pytest.approx(sum(float(o["elementwise_loss"].sum()) for o in outputs), rel=1e-6)
