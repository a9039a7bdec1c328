"""Every loss against an independent computation of its formula (numpy, explicit sums)."""

import math

import numpy as np
import pytest
import torch

from edgedistill.distill import losses

N, V = 7, 11


def _softmax(x, t):
    z = np.asarray(x, dtype=np.float64) / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(N, V, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (N,), generator=gen)
    weights = torch.tensor([1.0, 0.0, 1.0, 10.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    return student, teacher, labels, weights


def _reference(name, s, t, w, temp, beta=0.5, skew=0.1):
    ps, pt = _softmax(s.numpy(), temp), _softmax(t.numpy(), temp)
    if name == "fkl":
        rows = _kl(pt, ps)
    elif name == "rkl":
        rows = _kl(ps, pt)
    elif name == "jsd":
        m = beta * pt + (1 - beta) * ps
        rows = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    elif name == "skl":
        rows = _kl(pt, skew * pt + (1 - skew) * ps)
    else:
        rows = _kl(ps, skew * ps + (1 - skew) * pt)
    w = w.numpy()
    return temp**2 * (rows * w).sum() / (w > 0).sum()


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "skl", "srkl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_divergence_matches_formula(logits, name, temperature):
    s, t, _, w = logits
    got = losses.divergence(name, s, t, w, temperature, beta=0.3, skew=0.1).item()
    assert got == pytest.approx(_reference(name, s, t, w, temperature, beta=0.3), rel=1e-6, abs=1e-9)


def test_named_functions_agree_with_dispatch(logits):
    s, t, _, w = logits
    assert losses.forward_kl(s, t, w, 2.0) == losses.divergence("fkl", s, t, w, 2.0)
    assert losses.reverse_kl(s, t, w, 2.0) == losses.divergence("rkl", s, t, w, 2.0)
    assert losses.generalized_jsd(s, t, w, 2.0, beta=0.2) == losses.divergence("jsd", s, t, w, 2.0, beta=0.2)
    assert losses.skew_kl(s, t, w, 2.0, skew=0.1) == losses.divergence("skl", s, t, w, 2.0, skew=0.1)
    assert losses.skew_reverse_kl(s, t, w, 2.0) == losses.divergence("srkl", s, t, w, 2.0)


def test_forward_kl_is_the_seeds_distillation_loss_fn(logits):
    """The seed: T² · F.kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') over the supervised rows."""
    s, t, _, _ = logits
    temperature = 1.5
    seed = temperature**2 * torch.nn.functional.kl_div(
        torch.log_softmax(s / temperature, -1), torch.softmax(t / temperature, -1), reduction="batchmean"
    )
    assert losses.forward_kl(s, t, None, temperature).item() == pytest.approx(seed.item(), rel=1e-9)


def test_temperature_squared_scaling(logits):
    s, t, _, _ = logits
    # Same distributions at T=2 (logits doubled) must give 4x the T=1 divergence.
    assert losses.forward_kl(2 * s, 2 * t, None, 2.0).item() == pytest.approx(4 * losses.forward_kl(s, t).item())


def test_masked_positions_are_ignored(logits):
    s, t, labels, w = logits
    garbage_s, garbage_t = s.clone(), t.clone()
    garbage_s[w == 0] = 1e3 * torch.randn_like(s[w == 0])
    garbage_t[w == 0] = -1e3
    for name in losses.DIVERGENCES:
        assert losses.divergence(name, garbage_s, garbage_t, w).item() == pytest.approx(
            losses.divergence(name, s, t, w).item()
        )
    assert losses.cross_entropy(garbage_s, labels, w).item() == pytest.approx(losses.cross_entropy(s, labels, w).item())


def test_cross_entropy_weights(logits):
    s, _, labels, w = logits
    log_p = np.log(_softmax(s.numpy(), 1.0))
    nll = -log_p[np.arange(N), labels.numpy()]
    expected = (nll * w.numpy()).sum() / (w.numpy() > 0).sum()
    assert losses.cross_entropy(s, labels, w).item() == pytest.approx(expected, rel=1e-9)
    assert losses.cross_entropy(s, labels).item() == pytest.approx(nll.mean(), rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_alpha_mix(logits, temperature):
    s, t, labels, w = logits
    ce = losses.cross_entropy(s, labels, w)
    kd = losses.divergence("fkl", s, t, w, temperature)
    total, ce_part, kd_part = losses.distillation_loss(s, t, labels, w, alpha=1.0, temperature=temperature)
    assert total.item() == pytest.approx(ce.item()) and ce_part.item() == pytest.approx(ce.item())
    total, _, _ = losses.distillation_loss(s, t, labels, w, alpha=0.0, temperature=temperature)
    assert total.item() == pytest.approx(kd.item())
    total, ce_part, kd_part = losses.distillation_loss(s, t, labels, w, alpha=0.3, temperature=temperature)
    assert total.item() == pytest.approx(0.3 * ce.item() + 0.7 * kd.item())
    assert kd_part.item() == pytest.approx(kd.item())
    assert losses.mix(ce, kd, 0.3).item() == pytest.approx(total.item())


def test_ce_only_needs_no_teacher(logits):
    s, _, labels, w = logits
    total, ce, kd = losses.distillation_loss(s, None, labels, w, alpha=1.0)
    assert kd is None and total.item() == pytest.approx(losses.cross_entropy(s, labels, w).item())
    with pytest.raises(ValueError):
        losses.distillation_loss(s, None, labels, w, alpha=0.5)


def test_divergences_vanish_on_identical_distributions(logits):
    s, _, _, w = logits
    for name in losses.DIVERGENCES:
        assert abs(losses.divergence(name, s, s.clone(), w, 2.0).item()) < 1e-12


def test_jsd_ends_are_forward_and_reverse_kl(logits):
    s, t, _, w = logits
    assert losses.generalized_jsd(s, t, w, beta=0.0).item() == pytest.approx(losses.forward_kl(s, t, w).item())
    assert losses.generalized_jsd(s, t, w, beta=1.0).item() == pytest.approx(losses.reverse_kl(s, t, w).item())
    # symmetric JSD is bounded by log 2
    assert 0 < losses.generalized_jsd(s, t, None, beta=0.5).item() <= math.log(2)


def test_gradients_flow_only_to_student(logits):
    s, t, labels, w = logits
    s = s.clone().requires_grad_(True)
    total, _, _ = losses.distillation_loss(s, t, labels, w, alpha=0.5, temperature=2.0)
    total.backward()
    assert s.grad is not None and torch.all(s.grad[w == 0] == 0) and s.grad[w > 0].abs().sum() > 0


@pytest.mark.parametrize(
    "alpha, temperature, name", [(0.5, 1.0, "fkl"), (0.3, 2.0, "jsd"), (1.0, 1.0, "fkl"), (0.0, 1.5, "rkl")]
)
@pytest.mark.parametrize("teacher_form", ["hidden", "logits"])
def test_chunked_loss_equals_dense_loss_and_gradients(alpha, temperature, name, teacher_form):
    gen = torch.Generator().manual_seed(1)
    n, h, v = 37, 8, 29
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    teacher_head = torch.randn(v + 3, 6, generator=gen, dtype=torch.float64)  # padded teacher rows
    labels = torch.randint(0, v, (n,), generator=gen)
    weights = (torch.rand(n, generator=gen, dtype=torch.float64) > 0.3).double()
    weights[5] = 10.0
    teacher_logits = (teacher_hidden @ teacher_head.T)[:, :v]
    dense, dense_ce, dense_kd = losses.distillation_loss(
        hidden @ head.T, teacher_logits, labels, weights, alpha, temperature, name
    )
    dense.backward()
    expected_grads = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    teacher = (
        dict(teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head)
        if teacher_form == "hidden"
        else dict(teacher_logits=teacher_logits)
    )
    total, ce, kd = losses.chunked_distillation_loss(
        hidden, head, labels, weights, alpha=alpha, temperature=temperature, name=name, chunk=8, **teacher
    )
    assert total.item() == pytest.approx(dense.item(), rel=1e-9)
    assert ce.item() == pytest.approx(dense_ce.item(), rel=1e-9)
    assert (kd is None) == (dense_kd is None) and (kd is None or kd.item() == pytest.approx(dense_kd.item(), rel=1e-9))
    (2 * total).backward()
    assert torch.allclose(hidden.grad, 2 * expected_grads[0], atol=1e-10)
    assert torch.allclose(head.grad, 2 * expected_grads[1], atol=1e-10)


def _topk(teacher_logits, k):
    log_probs = torch.log_softmax(teacher_logits, -1)
    values, ids = torch.topk(log_probs, k, -1)
    tail = log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, tail


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_with_full_vocabulary_equals_dense(logits, temperature):
    s, t, _, w = logits
    ids, values, tail = _topk(t, V)
    assert torch.all(torch.isinf(tail))
    sparse = losses.sparse_forward_kl(s, ids, values, tail, w, temperature)
    assert sparse.item() == pytest.approx(losses.forward_kl(s, t, w, temperature).item(), rel=1e-9)


def test_sparse_kl_with_small_k_is_a_proper_divergence(logits):
    s, t, _, w = logits
    ids, values, tail = _topk(t, 3)
    assert abs(losses.sparse_forward_kl(t.clone(), ids, values, tail, w).item()) < 1e-12  # student == teacher
    assert losses.sparse_forward_kl(s, ids, values, tail, w).item() > 0
    # a student that matches the teacher's top-3 and tail bucket exactly, but spreads the tail differently, also
    # scores zero: the K + 1 buckets are all the cache knows
    reshuffled = torch.log_softmax(t, -1).clone()
    for row in range(N):
        rest = [i for i in range(V) if i not in ids[row].tolist()]
        reshuffled[row, rest] = reshuffled[row, rest].flip(0)
    assert abs(losses.sparse_forward_kl(reshuffled, ids, values, tail, w).item()) < 1e-12


@pytest.mark.parametrize("k", [5, 17])
@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.5), (0.5, 1.0), (0.0, 1.0), (1.0, 2.0)])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_sparse_equals_dense_sparse(k, alpha, temperature, weighted):
    """The closed-form gradient of the cached-teacher loss equals autograd through the reference functions."""
    gen = torch.Generator().manual_seed(3)
    n, h, v = 23, 8, 17
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ids, values, tail = _topk(torch.randn(n, v, generator=gen, dtype=torch.float64) * 3, k)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[:4] = ids[:4, 0]  # some labels among the teacher's top K
    weights = None
    if weighted:
        weights = (torch.rand(n, generator=gen, dtype=torch.float64) > 0.3).double()
        weights[5] = 10.0
    dense, dense_ce, dense_kd = losses.sparse_distillation_loss(
        hidden @ head.T, ids, values, tail, labels, weights, alpha, temperature
    )
    dense.backward()
    expected = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    total, ce, kd = losses.chunked_distillation_loss(
        hidden,
        head,
        labels,
        weights,
        teacher_ids=ids,
        teacher_logprobs=values,
        teacher_tail=tail,
        alpha=alpha,
        temperature=temperature,
        chunk=4,
    )
    assert total.item() == pytest.approx(dense.item(), rel=1e-9)
    assert ce.item() == pytest.approx(dense_ce.item(), rel=1e-9) and kd.item() == pytest.approx(dense_kd.item())
    total.backward()
    assert torch.allclose(hidden.grad, expected[0], atol=1e-10) and torch.allclose(head.grad, expected[1], atol=1e-10)


def test_chunked_cross_entropy_alone_equals_dense():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(19, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.randn(13, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (19,), generator=gen)
    weights = (torch.rand(19, generator=gen, dtype=torch.float64) > 0.3).double()
    dense = losses.cross_entropy(hidden @ head.T, labels, weights)
    dense.backward()
    expected = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    total, ce, kd = losses.chunked_distillation_loss(hidden, head, labels, weights, alpha=1.0, chunk=5)
    assert kd is None and total.item() == pytest.approx(dense.item(), rel=1e-9) == ce.item()
    total.backward()
    assert torch.allclose(hidden.grad, expected[0], atol=1e-10) and torch.allclose(head.grad, expected[1], atol=1e-10)


def test_chunked_loss_with_bf16_matmuls_stays_close():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(64, 32, generator=gen, requires_grad=True)
    head = (torch.randn(101, 32, generator=gen) * 0.2).requires_grad_(True)
    ids, values, tail = _topk(torch.randn(64, 101, generator=gen) * 3, 8)
    labels = torch.randint(0, 101, (64,), generator=gen)
    results = []
    for dtype in (None, torch.bfloat16):
        total, _, _ = losses.chunked_distillation_loss(
            hidden, head, labels, teacher_ids=ids, teacher_logprobs=values, teacher_tail=tail, matmul_dtype=dtype
        )
        total.backward()
        results.append((total.item(), hidden.grad.clone(), head.grad.clone()))
        hidden.grad = head.grad = None
    (exact, grad_h, grad_w), (low, low_h, low_w) = results
    assert low == pytest.approx(exact, rel=1e-2)
    assert torch.allclose(low_h, grad_h, atol=2e-3, rtol=5e-2) and torch.allclose(low_w, grad_w, atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("teacher_form", ["sparse", "logits"])
def test_a_frozen_head_gets_no_gradient_and_the_same_hidden_gradient(teacher_form):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(23, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.randn(17, 8, generator=gen, dtype=torch.float64)
    teacher_logits = torch.randn(23, 17, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 17, (23,), generator=gen)
    ids, values, tail = _topk(teacher_logits, 4)
    teacher = (
        {"teacher_ids": ids, "teacher_logprobs": values, "teacher_tail": tail}
        if teacher_form == "sparse"
        else {"teacher_logits": teacher_logits}
    )
    results = []
    for trained in (True, False):
        weight = head.clone().requires_grad_(trained)
        total, _, _ = losses.chunked_distillation_loss(hidden, weight, labels, chunk=5, **teacher)
        total.backward()
        results.append((total.item(), hidden.grad.clone(), weight.grad))
        hidden.grad = None
    (value, grad_h, grad_w), (frozen_value, frozen_h, frozen_w) = results
    assert grad_w is not None and frozen_w is None
    assert frozen_value == value and torch.equal(frozen_h, grad_h)


def test_cached_teacher_supports_forward_kl_only():
    hidden, head = torch.randn(4, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (4,))
    ids, values, tail = _topk(torch.randn(4, 11), 3)
    with pytest.raises(ValueError, match="fkl"):
        losses.chunked_distillation_loss(
            hidden, head, labels, None, teacher_ids=ids, teacher_logprobs=values, teacher_tail=tail, name="rkl"
        )


def test_the_torch_free_config_names_every_divergence():
    """A loss is added in distill/losses.py; the config, which imports without torch, validates --loss against its
    own list of names: the two must agree."""
    from edgedistill.distill.config import LOSSES

    assert set(LOSSES) == set(losses.DIVERGENCES)
