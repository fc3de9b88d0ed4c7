"""The routing losses of issue #23 against their published formulas, recomputed here in Python float64 loops.

load_balancing_loss: alpha * E * sum_i f_i * P_i with f_i the fraction of the T*K assignments (balanced: alpha;
all tokens on K experts holding all the probability: alpha * E / K). router_z_loss: mean of logsumexp^2.
update_correction_bias: bias_i += rate * sign(T*K/E - load_i), in place.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit import MoEConfig
from moekit.routing import load_balancing_loss, load_stats, route, router_z_loss, update_correction_bias
from moekit.testing import assert_close_to_reference

LOGIT_DTYPES = [torch.float64, torch.float32, torch.bfloat16]


# ---- the formulas, written out token by token and expert by expert ----------------------------------------------


def _softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    ex = [math.exp(x - m) for x in row]
    s = math.fsum(ex)
    return [e / s for e in ex]


def _logsumexp_row(row: list[float]) -> float:
    m = max(row)
    return m + math.log(math.fsum(math.exp(x - m) for x in row))


def ref_load_balancing(logits: list[list[float]], ids: list[list[int]], E: int, K: int, alpha: float) -> float:
    T = len(logits)
    if T == 0:
        return 0.0
    probs = [_softmax_row(row) for row in logits]
    P = [math.fsum(probs[t][i] for t in range(T)) / T for i in range(E)]
    f = [sum(row.count(i) for row in ids) / (T * K) for i in range(E)]
    return alpha * E * math.fsum(f[i] * P[i] for i in range(E))


def ref_load_balancing_grad(logits, ids, E, K, alpha) -> list[list[float]]:
    """d loss / d logits[t][j] = alpha * E / T * p[t][j] * (f_j - sum_i f_i p[t][i])."""
    T = len(logits)
    f = [sum(row.count(i) for row in ids) / (T * K) for i in range(E)]
    grad = []
    for row in logits:
        p = _softmax_row(row)
        mean_f = math.fsum(f[i] * p[i] for i in range(E))
        grad.append([alpha * E / T * p[j] * (f[j] - mean_f) for j in range(E)])
    return grad


def ref_z_loss(logits: list[list[float]]) -> float:
    T = len(logits)
    return math.fsum(_logsumexp_row(row) ** 2 for row in logits) / T if T else 0.0


def ref_z_loss_grad(logits) -> list[list[float]]:
    """d loss / d logits[t][j] = 2 / T * logsumexp(logits[t]) * softmax(logits[t])[j]."""
    T = len(logits)
    return [[2.0 / T * _logsumexp_row(row) * p for p in _softmax_row(row)] for row in logits]


# ---- draws -------------------------------------------------------------------------------------------------------


@st.composite
def routing_problems(draw, min_tokens: int = 0, max_tokens: int = 12):
    """(logits [T, E] float64, topk_ids [T, K] int32 distinct per token, not tied to the logits, K)."""
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, E))
    T = draw(st.integers(min_tokens, max_tokens))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 6.0))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64) * scale + draw(st.floats(-3.0, 3.0))
    rows = [torch.randperm(E, generator=g)[:K] for _ in range(T)]
    ids = torch.stack(rows) if T else torch.empty(0, K, dtype=torch.int64)
    return logits, ids.to(torch.int32), K


def _balanced_ids(T: int, E: int, K: int) -> torch.Tensor:
    """Token t takes experts (t*K + j) mod E, j < K: distinct per token; every expert gets T*K/E when E | T*K."""
    return torch.tensor([[(t * K + j) % E for j in range(K)] for t in range(T)], dtype=torch.int32)


# ---- load_balancing_loss -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("logits_dtype", LOGIT_DTYPES, ids=str)
@given(problem=routing_problems(), alpha=st.sampled_from([1.0, 0.01, 2.5]))
def test_load_balancing_loss_matches_the_formula(logits_dtype, problem, alpha):
    logits64, ids, K = problem
    logits = logits64.to(logits_dtype)
    E = logits.shape[1]
    loss = load_balancing_loss(logits, ids, alpha=alpha)
    assert loss.shape == () and loss.dtype == torch.promote_types(logits_dtype, torch.float32)
    # the reference reads the logits as stored (bf16 values exactly); the loss sums in float32 for bf16
    ref = ref_load_balancing(logits.double().tolist(), ids.tolist(), E, K, alpha)
    if not ids.shape[0]:
        assert float(loss) == 0.0
        return
    assert_close_to_reference(
        loss, torch.tensor(ref, dtype=torch.float64), torch.promote_types(logits_dtype, torch.float32), "loss"
    )
    # f_i <= 1/K (ids distinct per token) and sum P = 1 bound it by alpha * E / K
    assert 0.0 < float(loss) <= alpha * E / K * (1 + 1e-6)


@given(problem=routing_problems(min_tokens=1), alpha=st.sampled_from([1.0, 0.3]))
def test_load_balancing_gradient_is_the_explicit_formula(problem, alpha):
    logits, ids, K = problem
    logits = logits.clone().requires_grad_(True)
    load_balancing_loss(logits, ids, alpha=alpha).backward()
    grad = ref_load_balancing_grad(logits.detach().tolist(), ids.tolist(), logits.shape[1], K, alpha)
    ref = torch.tensor(grad, dtype=torch.float64)
    # the gradient can be near 0 everywhere (balanced dispatch): compare absolutely at the loss's scale too
    torch.testing.assert_close(logits.grad, ref, rtol=1e-10, atol=1e-13 * alpha)


@pytest.mark.parametrize(("T", "E", "K"), [(1, 1, 1), (3, 4, 2), (5, 3, 3), (4, 6, 1)])
def test_load_balancing_gradcheck(T, E, K):
    g = torch.Generator().manual_seed(T * 100 + E * 10 + K)
    logits = (torch.randn(T, E, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    assert torch.autograd.gradcheck(lambda z: load_balancing_loss(z, ids, alpha=0.7), (logits,))


@pytest.mark.parametrize(("E", "K"), [(1, 1), (4, 1), (4, 2), (6, 3), (5, 5), (8, 2)])
@pytest.mark.parametrize("logits_dtype", LOGIT_DTYPES, ids=str)
def test_balanced_dispatch_gives_alpha(E, K, logits_dtype):
    """Every f_i = 1/E: loss = alpha * sum_i P_i = alpha whatever the probabilities (a T-only f_i gives alpha*K)."""
    T, alpha = 2 * E, 0.37
    g = torch.Generator().manual_seed(E * 10 + K)
    logits = (torch.randn(T, E, generator=g) * 3 + 0.5).to(logits_dtype)
    loss = load_balancing_loss(logits, _balanced_ids(T, E, K), alpha=alpha)
    assert float(loss) == pytest.approx(alpha, rel=1e-6)


@given(problem=routing_problems(min_tokens=1))
def test_uniform_probabilities_give_alpha(problem):
    """Every P_i = 1/E (equal logits): loss = alpha * sum_i f_i = alpha whatever the dispatch."""
    _, ids, _ = problem
    E = int(problem[0].shape[1])
    logits = torch.full((ids.shape[0], E), 0.75, dtype=torch.float64)
    assert float(load_balancing_loss(logits, ids, alpha=1.5)) == pytest.approx(1.5, rel=1e-12)


@pytest.mark.parametrize(("E", "K"), [(4, 1), (8, 2), (6, 3), (3, 3)])
def test_collapsed_routing_gives_the_maximum(E, K):
    """All tokens on experts 0..K-1, which hold (almost) all the probability: alpha * E / K, the bound."""
    T, alpha = 7, 0.5
    logits = torch.full((T, E), -30.0, dtype=torch.float64)
    logits[:, :K] = 30.0 + torch.linspace(0.0, 0.1, T, dtype=torch.float64)[:, None]
    ids = torch.arange(K, dtype=torch.int32).expand(T, K)
    assert float(load_balancing_loss(logits, ids, alpha=alpha)) == pytest.approx(alpha * E / K, rel=1e-12)
    if K < E:  # the same probabilities with balanced dispatch: alpha, below the collapse
        balanced = load_balancing_loss(logits.repeat(E, 1), _balanced_ids(T * E, E, K), alpha=alpha)
        assert float(balanced) == pytest.approx(alpha, rel=1e-12)


def test_k_equal_e_is_always_balanced():
    """K = E: every token takes every expert, f_i = 1/E, so the loss is alpha and its gradient 0."""
    logits = (torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2).requires_grad_()
    ids = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(t)) for t in range(5)])
    loss = load_balancing_loss(logits, ids, alpha=0.2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.2, rel=1e-12)
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), rtol=0, atol=1e-15)


def test_a_hand_case_counts_the_assignments():
    """A hand case: T = 2, E = 2, K = 1, both tokens on expert 0: f = (1, 0), loss = alpha * 2 * P_0."""
    logits = torch.tensor([[1.0, 0.5], [2.0, -1.0]], dtype=torch.float64)
    ids = torch.tensor([[0], [0]], dtype=torch.int32)
    p0 = (1 / (1 + math.exp(-0.5)) + 1 / (1 + math.exp(-3.0))) / 2
    assert float(load_balancing_loss(logits, ids, alpha=0.1)) == pytest.approx(0.1 * 2 * p0, rel=1e-14)


# ---- router_z_loss -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logits_dtype", LOGIT_DTYPES, ids=str)
@given(problem=routing_problems())
def test_router_z_loss_matches_the_formula(logits_dtype, problem):
    logits = problem[0].to(logits_dtype)
    loss = router_z_loss(logits)
    assert loss.shape == () and loss.dtype == torch.promote_types(logits_dtype, torch.float32)
    if not logits.shape[0]:
        assert float(loss) == 0.0
        return
    ref = ref_z_loss(logits.double().tolist())
    assert_close_to_reference(
        loss, torch.tensor(ref, dtype=torch.float64), torch.promote_types(logits_dtype, torch.float32), "z-loss"
    )


@given(problem=routing_problems(min_tokens=1))
def test_router_z_loss_gradient_is_the_explicit_formula(problem):
    logits = problem[0].clone().requires_grad_(True)
    router_z_loss(logits).backward()
    ref = torch.tensor(ref_z_loss_grad(logits.detach().tolist()), dtype=torch.float64)
    torch.testing.assert_close(logits.grad, ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("T", "E"), [(1, 1), (3, 4), (6, 2)])
def test_router_z_loss_gradcheck(T, E):
    g = torch.Generator().manual_seed(T * 10 + E)
    logits = (torch.randn(T, E, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    assert torch.autograd.gradcheck(router_z_loss, (logits,))


def test_router_z_loss_hand_case():
    """One token, E equal logits c: (c + log E)^2."""
    logits = torch.full((1, 4), 0.5, dtype=torch.float64)
    assert float(router_z_loss(logits)) == pytest.approx((0.5 + math.log(4)) ** 2, rel=1e-14)


def test_bf16_logits_are_read_in_float32():
    """Large bf16 logits: softmax and logsumexp in float32 (in bf16, logsumexp ~ 200 has a step of 1)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 8, generator=g) * 4 + 200).to(torch.bfloat16).requires_grad_(True)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(16)]).to(torch.int32)
    z = router_z_loss(logits)
    lb = load_balancing_loss(logits, ids)
    (z + lb).backward()
    assert logits.grad.dtype == torch.bfloat16
    as64 = logits.detach().double().tolist()
    assert_close_to_reference(z, torch.tensor(ref_z_loss(as64), dtype=torch.float64), torch.float32, "z-loss")
    assert_close_to_reference(
        lb, torch.tensor(ref_load_balancing(as64, ids.tolist(), 8, 2, 1.0), dtype=torch.float64), torch.float32
    )


# ---- no tokens ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logits_dtype", LOGIT_DTYPES, ids=str)
def test_no_tokens_give_zero_losses_and_a_zero_gradient(logits_dtype):
    logits = torch.empty(0, 5, dtype=logits_dtype).requires_grad_(True)
    ids = torch.empty(0, 2, dtype=torch.int64)
    lb, z = load_balancing_loss(logits, ids, alpha=0.5), router_z_loss(logits)
    assert float(lb.detach()) == 0.0 and float(z.detach()) == 0.0
    (lb + z).backward()
    assert logits.grad is not None and logits.grad.shape == (0, 5)
    bias = torch.tensor([0.25, -0.5, 1.0, 0.0, 3.0])
    before = bias.clone()
    update_correction_bias(bias, ids, rate=0.1)
    assert torch.equal(bias, before)


# ---- update_correction_bias --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64], ids=str)
def test_bias_update_on_a_hand_built_load(bias_dtype):
    """E = 4, K = 2, T = 4: mean load 2; loads (4, 2, 1, 1): expert 0 down by rate, 1 unchanged, 2 and 3 up."""
    ids = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 0]], dtype=torch.int32)
    assert load_stats(ids, 4).tokens_per_expert.tolist() == [4, 2, 1, 1]
    bias = torch.tensor([0.5, -0.25, 1.0, 0.125], dtype=bias_dtype)
    rate = 2.0**-7  # dyadic: every sum below is exact in float32
    assert update_correction_bias(bias, ids, rate) is None
    expected = torch.tensor([0.5 - rate, -0.25, 1.0 + rate, 0.125 + rate], dtype=bias_dtype)
    assert torch.equal(bias, expected)


@given(problem=routing_problems(), rate=st.floats(0.0, 0.5))
def test_bias_update_matches_the_formula(problem, rate):
    logits, ids, K = problem
    T, E = logits.shape
    g = torch.Generator().manual_seed(T * 31 + E)
    bias = torch.randn(E, generator=g, dtype=torch.float64)
    start = bias.tolist()
    update_correction_bias(bias, ids, rate)
    mean = T * K / E
    loads = [sum(row.count(i) for row in ids.tolist()) for i in range(E)]
    sign = [(1.0 if load < mean else -1.0 if load > mean else 0.0) for load in loads]
    assert bias.tolist() == [b + rate * s for b, s in zip(start, sign)]


def test_k_equal_e_leaves_the_bias_unchanged():
    ids = torch.stack([torch.randperm(3, generator=torch.Generator().manual_seed(t)) for t in range(4)])
    bias = torch.tensor([0.1, 0.2, 0.3])
    update_correction_bias(bias, ids, 0.05)
    assert torch.equal(bias, torch.tensor([0.1, 0.2, 0.3]))


def test_bias_update_takes_no_gradient_and_keeps_the_leaf():
    bias = torch.zeros(4, requires_grad=True)
    update_correction_bias(bias, torch.tensor([[0], [0], [1], [0]]), 0.25)
    assert bias.is_leaf and bias.grad_fn is None
    assert bias.detach().tolist() == [-0.25, 0.0, 0.25, 0.25]


def test_bias_updates_balance_grouped_topk():
    """Repeated steps on skewed logits bring grouped_topk's load toward the mean (a flipped sign would not)."""
    E, K, T = 8, 2, 256
    config = MoEConfig(hidden_size=8, ffn_size=8, num_experts=E, top_k=K, router="grouped_topk", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(T, E, generator=g) + torch.linspace(2.0, -2.0, E)  # expert 0 favoured, 7 starved
    bias = torch.zeros(E)
    first = load_stats(route(logits, config, bias).topk_ids, E).max_over_mean
    for _ in range(100):  # measured: max/mean 3.09 -> 1.09 (a flipped sign: 3.39)
        update_correction_bias(bias, route(logits, config, bias).topk_ids, rate=1e-2)
    last = load_stats(route(logits, config, bias).topk_ids, E).max_over_mean
    assert first > 3.0 and last < 1.2, (first, last)
    assert bias[0] < 0 < bias[-1]


# ---- bad input ---------------------------------------------------------------------------------------------------


def _ids(rows):
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize(
    ("logits", "ids", "kwargs", "error", "match"),
    [
        (torch.randn(4), _ids([[0]]), {}, ValueError, "logits must be 2-D"),
        (torch.ones(2, 3, dtype=torch.int64), _ids([[0], [1]]), {}, TypeError, "logits must have a floating dtype"),
        (torch.randn(2, 0), _ids([[0], [0]]), {}, ValueError, "logits must have at least one expert"),
        (torch.randn(2, 3), torch.zeros(2, 1), {}, TypeError, "topk_ids must have dtype"),
        (torch.randn(2, 3), _ids([0, 1]), {}, ValueError, "topk_ids must be 2-D"),
        (torch.randn(2, 3), _ids([[0], [1], [2]]), {}, ValueError, r"topk_ids must have shape \(2, \*\)"),
        (torch.randn(2, 3), torch.empty(2, 0, dtype=torch.int32), {}, ValueError, "at least one column"),
        (torch.randn(2, 3), _ids([[0, 1, 2, 0]] * 2), {}, ValueError, "at most 3 columns"),
        (torch.randn(2, 3), _ids([[0], [3]]), {}, ValueError, r"topk_ids must lie in \[0, 3\)"),
        (torch.randn(2, 3), _ids([[-1], [2]]), {}, ValueError, r"topk_ids must lie in \[0, 3\)"),
        (torch.randn(2, 3), _ids([[0], [1]]), {"alpha": -0.1}, ValueError, "alpha must be a finite number >= 0"),
        (torch.randn(2, 3), _ids([[0], [1]]), {"alpha": math.nan}, ValueError, "alpha must be a finite number"),
        (torch.randn(2, 3), _ids([[0], [1]]), {"alpha": True}, ValueError, "alpha must be a finite number"),
    ],
)
def test_load_balancing_loss_rejects_bad_input(logits, ids, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_balancing_loss(logits, ids, **kwargs)


@pytest.mark.parametrize(
    ("logits", "error", "match"),
    [
        (torch.randn(2, 3, 1), ValueError, "logits must be 2-D"),
        (torch.ones(2, 3, dtype=torch.int32), TypeError, "logits must have a floating dtype"),
        ([[1.0, 2.0]], TypeError, "logits must be a torch.Tensor"),
        (torch.randn(3, 0), ValueError, "logits must have at least one expert"),
    ],
)
def test_router_z_loss_rejects_bad_input(logits, error, match):
    with pytest.raises(error, match=match):
        router_z_loss(logits)


@pytest.mark.parametrize(
    ("bias", "ids", "rate", "error", "match"),
    [
        (torch.zeros(3, dtype=torch.bfloat16), _ids([[0]]), 0.1, TypeError, "bias must have dtype"),
        (torch.zeros(1, 3), _ids([[0]]), 0.1, ValueError, "bias must be 1-D"),
        (torch.zeros(0), _ids([[0]]), 0.1, ValueError, "bias must have at least one expert"),
        (torch.zeros(3), _ids([[3]]), 0.1, ValueError, r"topk_ids must lie in \[0, 3\)"),
        (torch.zeros(3), torch.zeros(1, 1), 0.1, TypeError, "topk_ids must have dtype"),
        (torch.zeros(3), _ids([[0]]), -1e-3, ValueError, "rate must be a finite number >= 0"),
        (torch.zeros(3), _ids([[0]]), math.inf, ValueError, "rate must be a finite number >= 0"),
        (torch.zeros(3), _ids([[0]]), "0.1", ValueError, "rate must be a finite number >= 0"),
    ],
)
def test_update_correction_bias_rejects_bad_input(bias, ids, rate, error, match):
    before = bias.clone()
    with pytest.raises(error, match=match):
        update_correction_bias(bias, ids, rate)
    assert torch.equal(bias, before), "a refused update must leave the bias as it was"
