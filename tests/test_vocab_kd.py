"""KD through a trimmed vocabulary's map (``distill/vocab.py``'s ``map_sparse`` and ``TeacherMapper``, the losses of
``distill/losses.py``) against a hand computation over buckets: the teacher's top-K ids a student kept, one bucket
for the rest, in float64 on a teacher of a few dozen tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgedistill.distill import losses
from edgedistill.distill.vocab import TeacherMapper, VocabMap, map_sparse

VT, VS, K, ROWS, HIDDEN = 30, 18, 5, 8, 6


@pytest.fixture(scope="module")
def kd_setup():
    """A teacher over VT tokens, a student keeping VS of them, the teacher's top-K (float64) and a map."""
    gen = torch.Generator().manual_seed(11)
    kept = torch.randperm(VT, generator=gen)[:VS].sort().values
    dropped = torch.tensor([t for t in range(VT) if t not in kept.tolist()])
    teacher_logits = torch.randn(ROWS, VT, generator=gen, dtype=torch.float64) * 2
    teacher_logits[0, dropped[:K]] += 9.0  # row 0: every top-K id is dropped
    teacher_logits[1, kept[:K]] += 9.0  # row 1: none is
    probs = torch.softmax(teacher_logits, -1)
    values, ids = torch.topk(probs.log(), K, -1)
    tail = probs.log().scatter(-1, ids, float("-inf")).logsumexp(-1)
    vocab_map = VocabMap(kept.numpy().astype(np.int64), VT)
    to_student = torch.from_numpy(vocab_map.to_student)
    is_kept = to_student[ids] >= 0
    assert not is_kept[0].any() and is_kept[1].all() and any(0 < int(r.sum()) < K for r in is_kept[2:])
    hidden = torch.randn(ROWS, HIDDEN, generator=gen, dtype=torch.float64)
    head = torch.randn(VS, HIDDEN, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, VS, (ROWS,), generator=gen)
    weights = torch.tensor([1.0, 1.0, 0.0, 3.0, 1.0, 1.0, 10.0, 1.0], dtype=torch.float64)
    signal = {"teacher_ids": ids, "teacher_logprobs": values, "teacher_tail": tail}
    return dict(
        probs=probs, signal=signal, vocab_map=vocab_map, to_student=to_student, hidden=hidden, head=head,
        labels=labels, weights=weights, teacher_logits=teacher_logits,
    )  # fmt: skip


def _reference_kd(student_logits, setup, mode, temperature):
    """T² KL(teacher buckets || student buckets), by hand: the buckets are the student ids of the kept top-K and one
    bucket for every other student id; the teacher's from its full distribution (``tail``: the dropped top-K mass
    joins the rest; ``renorm``: it is removed and the rest renormalised), then tempered as K + 1 tokens."""
    probs, ids, table = setup["probs"], setup["signal"]["teacher_ids"], setup["to_student"]
    rows = []
    for n in range(ROWS):
        top = ids[n].tolist()
        kept_top = [t for t in top if table[t] >= 0]
        dropped_mass = sum(probs[n, t] for t in top if table[t] < 0)
        rest = sum(probs[n, t] for t in range(VT) if t not in top)
        teacher = [probs[n, t] for t in kept_top]
        if mode == "tail":
            teacher.append(rest + dropped_mass)
        else:
            teacher = [p / (1 - dropped_mass) for p in [*teacher, rest]]
        teacher = torch.stack([torch.as_tensor(p) for p in teacher]) ** (1 / temperature)
        teacher = teacher / teacher.sum()
        q = torch.softmax(student_logits[n] / temperature, -1)
        bucket_ids = [int(table[t]) for t in kept_top]
        others = [j for j in range(VS) if j not in bucket_ids]
        student = torch.cat([q[bucket_ids], q[others].sum().reshape(1)])
        terms = [p * (torch.log(p) - torch.log(s)) for p, s in zip(teacher, student) if p > 0]
        rows.append(temperature**2 * torch.stack(terms).sum())
    weights = setup["weights"]
    return (torch.stack(rows) * weights).sum() / (weights > 0).sum()


def _reference_ce(student_logits, setup):
    log_q = torch.log_softmax(student_logits, -1)
    picked = -log_q[torch.arange(ROWS), setup["labels"]]
    weights = setup["weights"]
    return (picked * weights).sum() / (weights > 0).sum()


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_map_sparse_layout(kd_setup, mode):
    signal, table = kd_setup["signal"], kd_setup["to_student"]
    mapped = map_sparse(signal, table, mode)
    ids, logprobs, tail = mapped["teacher_ids"], mapped["teacher_logprobs"], mapped["teacher_tail"]
    assert ids.shape == logprobs.shape == (ROWS, K) and tail.shape == (ROWS,)
    for n in range(ROWS):
        valid = table[signal["teacher_ids"][n]] >= 0
        kept_ids = set(ids[n][valid].tolist())
        assert ids[n][valid].tolist() == table[signal["teacher_ids"][n]][valid].tolist()
        assert torch.equal(logprobs[n][valid], signal["teacher_logprobs"][n][valid])
        assert torch.isneginf(logprobs[n][~valid]).all()
        assert all(0 <= int(i) < VS and int(i) not in kept_ids for i in ids[n][~valid])
        dropped = signal["teacher_logprobs"][n][~valid].exp().sum()
        expected_tail = signal["teacher_tail"][n].exp() + (dropped if mode == "tail" else 0.0)
        assert tail[n].exp().item() == pytest.approx(expected_tail.item(), rel=1e-12)
    # nothing dropped: the signal passes through, ids renumbered
    row = {key: value[1:2] for key, value in signal.items()}
    same = map_sparse(row, table, mode)
    assert same["teacher_ids"].tolist() == table[row["teacher_ids"]].tolist()
    assert same["teacher_logprobs"] is row["teacher_logprobs"] and same["teacher_tail"] is row["teacher_tail"]
    # the mapper does the same on its device
    by_mapper = TeacherMapper(kd_setup["vocab_map"].with_mode(mode), "cpu").signal(signal)
    for key in mapped:
        assert torch.equal(by_mapper[key], mapped[key])


def _padding_slots(kd_setup) -> torch.Tensor:
    """[ROWS] the number of top-K ids each row loses to the map (padding slots after ``map_sparse``)."""
    return (kd_setup["to_student"][kd_setup["signal"]["teacher_ids"]] < 0).sum(-1)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_forward_kl_through_the_map_matches_the_buckets_by_hand(kd_setup, mode, temperature):
    mapped = map_sparse(kd_setup["signal"], kd_setup["to_student"], mode)
    sparse = (mapped["teacher_ids"], mapped["teacher_logprobs"], mapped["teacher_tail"])
    logits = (kd_setup["hidden"] @ kd_setup["head"].T).requires_grad_(True)
    got = losses.sparse_forward_kl(logits, *sparse, kd_setup["weights"], temperature)
    expected = _reference_kd(logits, kd_setup, mode, temperature)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    # gradients on the rows with at most one padding slot (the test below checks the others)
    few = (_padding_slots(kd_setup) <= 1).double()
    assert 0 < few.sum() < ROWS
    masked = dict(kd_setup, weights=kd_setup["weights"] * few)
    (grad,) = torch.autograd.grad(losses.sparse_forward_kl(logits, *sparse, masked["weights"], temperature), logits)
    (expected_grad,) = torch.autograd.grad(_reference_kd(logits, masked, mode, temperature), logits)
    assert torch.allclose(grad, expected_grad, rtol=1e-8, atol=1e-12)
    # the all-dropped row (0) has one bucket: in renorm mode it costs nothing whatever the student
    if mode == "renorm":
        only_row0 = torch.zeros(ROWS, dtype=torch.float64)
        only_row0[0] = 1.0
        assert abs(losses.sparse_forward_kl(logits.detach(), *sparse, only_row0, temperature).item()) < 1e-12


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_sparse_forward_kl_gradient_with_several_padding_slots(kd_setup, mode):
    mapped = map_sparse(kd_setup["signal"], kd_setup["to_student"], mode)
    sparse = (mapped["teacher_ids"], mapped["teacher_logprobs"], mapped["teacher_tail"])
    assert _padding_slots(kd_setup).max() >= 2
    logits = (kd_setup["hidden"] @ kd_setup["head"].T).requires_grad_(True)
    (grad,) = torch.autograd.grad(losses.sparse_forward_kl(logits, *sparse, kd_setup["weights"]), logits)
    (expected_grad,) = torch.autograd.grad(_reference_kd(logits, kd_setup, mode, 1.0), logits)
    assert torch.allclose(grad, expected_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("alpha, temperature, chunk", [(0.0, 1.0, 3), (0.5, 1.0, 3), (0.5, 2.0, 3), (0.5, 1.0, 1)])
def test_chunked_loss_through_the_map_matches_the_reference(kd_setup, mode, alpha, temperature, chunk):
    """The closed-form gradient (chunk 1: row 1 is a chunk without padding slots, row 0 one of padding slots only)
    against autograd through the hand computation and against finite differences; the values against the
    reference functions too."""
    mapped = map_sparse(kd_setup["signal"], kd_setup["to_student"], mode)
    sparse = dict(
        teacher_ids=mapped["teacher_ids"],
        teacher_logprobs=mapped["teacher_logprobs"],
        teacher_tail=mapped["teacher_tail"],
    )
    labels, weights = kd_setup["labels"], kd_setup["weights"]
    hidden = kd_setup["hidden"].clone().requires_grad_(True)
    head = kd_setup["head"].clone().requires_grad_(True)
    total, ce, kd = losses.chunked_distillation_loss(
        hidden, head, labels, weights, alpha=alpha, temperature=temperature, chunk=chunk, **sparse
    )
    total.backward()
    got_grads = hidden.grad.clone(), head.grad.clone()

    hidden.grad = head.grad = None
    logits = hidden @ head.T
    reference_kd = _reference_kd(logits, kd_setup, mode, temperature)
    reference_ce = _reference_ce(logits, kd_setup)
    reference = alpha * reference_ce + (1 - alpha) * reference_kd
    reference.backward()
    reference_grads = hidden.grad.clone(), head.grad.clone()
    with torch.no_grad():
        dense, dense_ce, dense_kd = losses.sparse_distillation_loss(
            logits, *sparse.values(), labels, weights, alpha, temperature
        )

    assert total.item() == pytest.approx(reference.item(), rel=1e-9)
    assert dense.item() == pytest.approx(reference.item(), rel=1e-9)
    assert ce.item() == pytest.approx(reference_ce.item(), rel=1e-9) == dense_ce.item()
    assert kd.item() == pytest.approx(reference_kd.item(), rel=1e-9, abs=1e-12)
    assert dense_kd.item() == pytest.approx(reference_kd.item(), rel=1e-9, abs=1e-12)
    for got, expected in zip(got_grads, reference_grads):
        assert torch.allclose(got, expected, rtol=1e-8, atol=1e-11)

    # and against finite differences of the function itself
    def value(h, w):
        return losses.chunked_distillation_loss(
            h, w, labels, weights, alpha=alpha, temperature=temperature, chunk=chunk, **sparse
        )[0]

    assert torch.autograd.gradcheck(
        value,
        (kd_setup["hidden"].clone().requires_grad_(True), kd_setup["head"].clone().requires_grad_(True)),
        fast_mode=True,
    )


def test_online_teacher_through_the_map_is_the_renormalised_kept_rows(kd_setup):
    """A dense teacher: the mapper cuts its head (or logits) to the kept rows; the KD is then the forward KL to the
    teacher's distribution over those rows, renormalised."""
    gen = torch.Generator().manual_seed(5)
    teacher_hidden = torch.randn(ROWS, 4, generator=gen, dtype=torch.float64)
    teacher_head = torch.randn(VT + 3, 4, generator=gen, dtype=torch.float64)  # rows beyond the tokenizer too
    mapper = TeacherMapper(kd_setup["vocab_map"], "cpu")
    kept = torch.from_numpy(kd_setup["vocab_map"].teacher_ids)
    assert torch.equal(mapper.teacher_inputs(torch.arange(VS)), kept)
    by_head = mapper.signal({"teacher_hidden": teacher_hidden, "teacher_head_weight": teacher_head})
    assert torch.equal(by_head["teacher_head_weight"], teacher_head[kept])
    again = mapper.signal({"teacher_hidden": teacher_hidden, "teacher_head_weight": teacher_head})
    assert again["teacher_head_weight"] is by_head["teacher_head_weight"]  # the kept rows are cut once
    full_logits = teacher_hidden @ teacher_head.T
    by_logits = mapper.signal({"teacher_logits": full_logits})
    assert torch.equal(by_logits["teacher_logits"], full_logits[:, kept])
    assert mapper.signal(None) is None

    p = torch.softmax(full_logits[:, kept], -1)  # renormalised over the kept rows
    hidden = kd_setup["hidden"].clone().requires_grad_(True)
    q = torch.softmax(hidden @ kd_setup["head"].T, -1)
    expected = ((p * (p.log() - q.log())).sum(-1) * kd_setup["weights"]).sum() / (kd_setup["weights"] > 0).sum()
    for signal in (by_head, by_logits):
        _, _, kd = losses.chunked_distillation_loss(
            hidden, kd_setup["head"], kd_setup["labels"], kd_setup["weights"], alpha=0.0, chunk=3, **signal
        )
        assert kd.item() == pytest.approx(expected.item(), rel=1e-9)
