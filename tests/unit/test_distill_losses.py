"""Distillation losses pinned against naive references written from the papers' definitions.

Each reference below is a plain Python loop over the vocabulary in float64 (``math``), written from the equation
in the docstring it checks, and fed tensors from a seeded ``torch.Generator``.
"""

from __future__ import annotations

import math

import pytest
import torch

from recsys_slm.config import ConfigError
from recsys_slm.distill import (
    BinaryKLLoss,
    DistillLoss,
    DistillLossConfig,
    HiddenStateLoss,
    ListwiseKLLoss,
    MarginMSELoss,
    forward_kl,
    generalized_jsd,
    hard_label_ce,
    mix_losses,
    reverse_kl,
    topk_distill_loss,
    topk_storage_bytes,
    total_variation,
    uniform_layer_map,
)


# ------------------------------------------------------------------------------------------------ references
def softmax(row, temperature=1.0):
    m = max(row)
    e = [math.exp((x - m) / temperature) for x in row]
    z = sum(e)
    return [x / z for x in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def jsd(p_teacher, q_student, beta):
    """GKD Eq. 1: β·KL(P || βP + (1−β)Q) + (1−β)·KL(Q || βP + (1−β)Q), P = teacher, Q = student."""
    m = [beta * a + (1 - beta) * b for a, b in zip(p_teacher, q_student)]
    return beta * kl(p_teacher, m) + (1 - beta) * kl(q_student, m)


def tv(p, q):
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def naive(kind, student, teacher, temperature=1.0, beta=0.5, rows=None):
    """Mean over rows of the divergence between softmax(teacher/T) and softmax(student/T), times T²."""
    s, t = student.tolist(), teacher.tolist()
    rows = range(len(s)) if rows is None else rows
    values = []
    for n in rows:
        q, p = softmax(s[n], temperature), softmax(t[n], temperature)
        values.append(
            {"forward_kl": kl(p, q), "reverse_kl": kl(q, p), "jsd": jsd(p, q, beta), "tv": tv(q, p)}[kind]
        )
    return temperature**2 * sum(values) / len(values)


FUNCS = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "tv": total_variation,
    "jsd": lambda s, t, **kw: generalized_jsd(s, t, beta=0.3, **kw),
}


def logits_pair(seed=0, n=5, v=11, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(n, v, generator=g, dtype=dtype)).requires_grad_(True)
    teacher = scale * torch.randn(n, v, generator=g, dtype=dtype)
    return student, teacher


# ------------------------------------------------------------------------------------------------ token losses
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_matches_naive_reference(kind, temperature):
    student, teacher = logits_pair()
    got = FUNCS[kind](student, teacher, temperature=temperature)
    want = naive(kind, student, teacher, temperature, beta=0.3)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_generalized_jsd_is_pinned():
    """Like TRL's TestGeneralizedJSDLossIsPinned: seeded inputs, several β, the paper's formula in plain floats."""
    student, teacher = logits_pair(seed=1234, n=4, v=32)
    for beta in (0.1, 0.5, 0.9):
        got = generalized_jsd(student, teacher, beta=beta, temperature=0.9, t2_scaling=False)
        want = naive("jsd", student, teacher, 0.9, beta) / 0.9**2
        assert got.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_identical_distributions_give_zero(kind):
    student, _ = logits_pair()
    assert FUNCS[kind](student, student.detach().clone(), temperature=1.7).item() == pytest.approx(
        0.0, abs=1e-12
    )
    # a constant shift of the logits is the same distribution
    assert FUNCS[kind](student, student.detach() + 3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_two_point_closed_forms():
    p_teacher = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    q_student = torch.tensor([[0.9, 0.1]], dtype=torch.float64).log()
    assert forward_kl(q_student, p_teacher).item() == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0)
    )
    assert reverse_kl(q_student, p_teacher).item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    assert total_variation(q_student, p_teacher).item() == pytest.approx(0.4)
    # symmetric JSD of (0.5, 0.5) and (0.9, 0.1): mixture (0.7, 0.3)
    m = (0.7, 0.3)
    want = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    want += 0.5 * (0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1]))
    assert generalized_jsd(q_student, p_teacher, beta=0.5).item() == pytest.approx(want)


def test_jsd_endpoints_and_limits():
    student, teacher = logits_pair(seed=3)
    fkl, rkl = forward_kl(student, teacher).item(), reverse_kl(student, teacher).item()
    # β = 0 and β = 1 are special-cased to exactly forward / reverse KL (TRL convention) ...
    assert generalized_jsd(student, teacher, beta=0.0).item() == fkl
    assert generalized_jsd(student, teacher, beta=1.0).item() == rkl
    # ... which are the limits of the β-normalised mixture formula
    eps = 1e-6
    assert generalized_jsd(student, teacher, beta=eps).item() / eps == pytest.approx(fkl, rel=1e-4)
    assert generalized_jsd(student, teacher, beta=1 - eps).item() / eps == pytest.approx(rkl, rel=1e-4)
    # while the unnormalised mixture formula itself vanishes at both ends
    assert generalized_jsd(student, teacher, beta=eps).item() < 1e-5
    assert generalized_jsd(student, teacher, beta=1 - eps).item() < 1e-5


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_t_squared_scaling(kind):
    student, teacher = logits_pair()
    scaled = FUNCS[kind](student, teacher, temperature=3.0)
    plain = FUNCS[kind](student, teacher, temperature=3.0, t2_scaling=False)
    assert scaled.item() == pytest.approx(9.0 * plain.item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_mask_ignores_masked_rows(kind):
    student, teacher = logits_pair(n=6)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    garbage_student = student.detach().clone()
    garbage_student[~mask] = 1e4 * torch.arange(11, dtype=torch.float64)  # would dominate if it were used
    garbage_student.requires_grad_(True)
    garbage_teacher = teacher.clone()
    garbage_teacher[~mask] = -1e4
    got = FUNCS[kind](garbage_student, garbage_teacher, mask=mask)
    want = naive(kind, student, teacher, beta=0.3, rows=[0, 2, 3, 5])
    assert got.item() == pytest.approx(want, rel=1e-10)
    got.backward()
    assert torch.all(garbage_student.grad[~mask] == 0)
    assert torch.all(garbage_student.grad[mask].abs().sum(-1) > 0)
    # an all-masked batch gives 0, still differentiable
    zero = FUNCS[kind](student, teacher, mask=torch.zeros(6))
    assert zero.item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_gradients_reach_the_student_only(kind):
    student, teacher = logits_pair()
    teacher.requires_grad_(True)
    FUNCS[kind](student, teacher, temperature=2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_half_precision_is_upcast():
    student, teacher = logits_pair(dtype=torch.float32)
    want = forward_kl(student, teacher, temperature=2.0)
    got = forward_kl(student.detach().bfloat16(), teacher.bfloat16(), temperature=2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=5e-2)


def test_hard_label_ce_matches_naive():
    student, _ = logits_pair()
    labels = torch.tensor([3, -100, 0, 10, 7])
    got = hard_label_ce(student, labels)
    rows = [0, 2, 3, 4]
    want = sum(-math.log(softmax(student[n].tolist())[int(labels[n])]) for n in rows) / len(rows)
    assert got.item() == pytest.approx(want, rel=1e-10)
    assert hard_label_ce(student, torch.full((5,), -100)).item() == 0.0


def test_mix_losses():
    ce, kd = torch.tensor(2.0), torch.tensor(10.0)
    assert mix_losses(ce, kd, 0.9).item() == pytest.approx(0.1 * 2.0 + 0.9 * 10.0)
    assert mix_losses(ce, kd, 0.0).item() == 2.0 and mix_losses(ce, kd, 1.0).item() == 10.0
    with pytest.raises(ValueError, match="r must be in"):
        mix_losses(ce, kd, 1.5)


# ------------------------------------------------------------------------------------------------ top-k
def naive_topk(kind, student, ids, teacher_logprobs, temperature=1.0, beta=0.5):
    """Buckets (top-k ids, tail) for both sides from their definitions, then the divergence, times T²."""
    values = []
    for n in range(student.shape[0]):
        q = softmax(student[n].tolist(), temperature)
        top = [int(i) for i in ids[n]]
        qb = [q[i] for i in top] + [sum(q) - sum(q[i] for i in top)]
        pt = [math.exp(x) for x in teacher_logprobs[n].tolist()]
        pb = pt + [max(0.0, 1.0 - sum(pt))]
        values.append({"forward_kl": kl(pb, qb), "reverse_kl": kl(qb, pb), "jsd": jsd(pb, qb, beta),
                       "tv": tv(qb, pb)}[kind])  # fmt: skip
    return temperature**2 * sum(values) / len(values)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_topk_matches_naive_buckets_and_bounds_full_kl(kind):
    student, teacher = logits_pair(seed=7, n=4, v=20)
    teacher_logp = torch.log_softmax(teacher, -1)
    top = teacher_logp.topk(5, dim=-1)
    ids, lps = top.indices.int(), top.values
    got = topk_distill_loss(student, ids, lps, kind=kind, temperature=1.5, beta=0.3)
    want = naive_topk(kind, student, ids, lps, temperature=1.5, beta=0.3)
    assert got.item() == pytest.approx(want, rel=1e-9)
    full = FUNCS[kind](student, teacher * 1.0, temperature=1.0)
    if kind != "jsd":  # coarse-graining never increases KL/TV (data processing inequality)
        assert topk_distill_loss(student, ids, lps, kind=kind).item() <= full.item() + 1e-12


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_topk_with_whole_vocabulary_equals_full_loss(kind):
    student, teacher = logits_pair(seed=8, n=3, v=9)
    teacher_logp = torch.log_softmax(teacher / 2.0, -1)
    top = teacher_logp.topk(9, dim=-1)
    got = topk_distill_loss(student, top.indices, top.values, kind=kind, temperature=2.0, beta=0.3)
    want = FUNCS[kind](student, teacher, temperature=2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)


def test_topk_float16_cache_and_storage_cost():
    student, teacher = logits_pair(seed=9, n=3, v=50, dtype=torch.float32)
    top = torch.log_softmax(teacher, -1).topk(8, dim=-1)
    cached = topk_distill_loss(student, top.indices.int(), top.values.half())
    exact = topk_distill_loss(student, top.indices, top.values)
    assert cached.item() == pytest.approx(exact.item(), rel=1e-2)
    cached.backward()
    assert torch.isfinite(student.grad).all()
    assert topk_storage_bytes(20) == 120 and topk_storage_bytes(20, num_positions=8) == 960


# ------------------------------------------------------------------------------------------------ DistillLoss
def test_distill_loss_config_validation():
    with pytest.raises(ConfigError, match="kind"):
        DistillLossConfig(kind="kl")
    with pytest.raises(ConfigError, match="temperature"):
        DistillLossConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="beta"):
        DistillLossConfig(beta=1.5)
    with pytest.raises(ConfigError, match="ce_weight"):
        DistillLossConfig(ce_weight=-0.1)


def test_distill_loss_mixes_ce_and_divergence():
    student, teacher = logits_pair()
    labels = torch.tensor([1, 2, -100, 4, 5])
    mask = torch.tensor([1, 1, 1, 0, 1])
    loss = DistillLoss(DistillLossConfig(kind="jsd", temperature=2.0, beta=0.3, ce_weight=0.1))
    got = loss(student, teacher, labels=labels, mask=mask)
    ce = hard_label_ce(student, torch.tensor([1, 2, -100, -100, 5]))
    kd = generalized_jsd(student, teacher, beta=0.3, mask=mask, temperature=2.0)
    assert got.item() == pytest.approx(0.1 * ce.item() + 0.9 * kd.item(), rel=1e-12)
    ce_only = DistillLoss(DistillLossConfig(kind="ce"))(student, labels=labels)
    assert ce_only.item() == pytest.approx(hard_label_ce(student, labels).item())
    with pytest.raises(ValueError, match="labels are required"):
        loss(student, teacher)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        DistillLoss()(student)


def test_distill_loss_top_k_teacher():
    student, teacher = logits_pair(seed=11, v=15)
    top = torch.log_softmax(teacher, -1).topk(4, dim=-1)
    got = DistillLoss(DistillLossConfig(kind="reverse_kl", temperature=1.5))(
        student, teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values
    )
    want = topk_distill_loss(student, top.indices, top.values, kind="reverse_kl", temperature=1.5)
    assert got.item() == pytest.approx(want.item())


# ------------------------------------------------------------------------------------------------ ranker losses
def test_binary_kl_matches_bernoulli_kl_and_two_way_forward_kl():
    student, teacher = logits_pair(seed=21, n=6, v=2)
    loss = BinaryKLLoss(temperature=2.0)
    got = loss(student, teacher)
    want = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        p = 1 / (1 + math.exp(-(t[0] - t[1]) / 2.0))
        q = 1 / (1 + math.exp(-(s[0] - s[1]) / 2.0))
        want += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert got.item() == pytest.approx(4.0 * want / 6, rel=1e-10)
    assert got.item() == pytest.approx(forward_kl(student, teacher, temperature=2.0).item(), rel=1e-10)
    diffs = loss(student[:, 0] - student[:, 1], teacher[:, 0] - teacher[:, 1])
    assert diffs.item() == pytest.approx(got.item(), rel=1e-10)
    mask = torch.tensor([1, 0, 1, 1, 1, 0])
    assert loss(student, teacher, mask=mask).item() == pytest.approx(
        forward_kl(student, teacher, mask=mask, temperature=2.0).item(), rel=1e-10
    )
    teacher.requires_grad_(True)
    loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_listwise_kl_with_ragged_lists():
    g = torch.Generator().manual_seed(22)
    student = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool
    )
    got = ListwiseKLLoss(temperature=0.5)(student, teacher, mask)
    want = []
    for b in (0, 1, 3):  # row 2 has no candidate and is skipped
        keep = [j for j in range(5) if mask[b, j]]
        p = softmax([teacher[b, j].item() for j in keep], 0.5)
        q = softmax([student[b, j].item() for j in keep], 0.5)
        want.append(kl(p, q))
    assert want[-1] == 0.0  # one candidate: both distributions are a point mass
    assert got.item() == pytest.approx(0.25 * sum(want) / 3, rel=1e-10)
    got.backward()
    assert torch.all(student.grad[~mask] == 0)
    assert ListwiseKLLoss()(student, student.detach()).item() == pytest.approx(0.0, abs=1e-12)


def test_margin_mse_pairs():
    g = torch.Generator().manual_seed(23)
    student = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, generator=g, dtype=torch.float64)
    s, t = student.tolist(), teacher.tolist()
    loss = MarginMSELoss()
    # column 0 positive, the rest negatives
    errs = [((s[b][0] - s[b][j]) - (t[b][0] - t[b][j])) ** 2 for b in range(3) for j in range(1, 4)]
    assert loss(student, teacher).item() == pytest.approx(sum(errs) / len(errs), rel=1e-10)
    # the classic (d+, d−) triple
    triple = ((s[0][0] - s[0][1]) - (t[0][0] - t[0][1])) ** 2
    assert loss(student[:1, :2], teacher[:1, :2]).item() == pytest.approx(triple, rel=1e-10)
    # labelled lists: every (i, j) with label_i > label_j, masked candidates excluded
    labels = torch.tensor([[2, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    errs = [
        ((s[b][i] - s[b][j]) - (t[b][i] - t[b][j])) ** 2
        for b in range(3)
        for i in range(4)
        for j in range(4)
        if labels[b, i] > labels[b, j] and mask[b, i] and mask[b, j]
    ]
    assert len(errs) == 2 + 1 + 4  # row 2 has no pair
    got = loss(student, teacher, labels=labels, mask=mask)
    assert got.item() == pytest.approx(sum(errs) / len(errs), rel=1e-10)
    # a constant offset between student and teacher scores costs nothing
    assert loss(teacher + 5.0, teacher).item() == pytest.approx(0.0, abs=1e-12)


def test_hidden_state_loss_mse_and_cosine_with_projection():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(24)
    student = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mse = HiddenStateLoss(4, 6, "mse")
    proj = mse.proj.weight.detach()  # (6, 4)
    got = mse(student, teacher, mask)
    rows = [(0, 0), (0, 1), (1, 0)]
    want = 0.0
    for b, i in rows:
        z = proj @ student[b, i].detach()
        want += ((z - teacher[b, i].detach()) ** 2).mean().item()
    assert got.item() == pytest.approx(want / 3, rel=1e-5)
    got.backward()
    assert teacher.grad is None and mse.proj.weight.grad.abs().sum() > 0 and student.grad.abs().sum() > 0
    cos = HiddenStateLoss(4, 6, "cosine")
    proj = cos.proj.weight.detach()
    want = 0.0
    for b, i in rows:
        z, t = proj @ student[b, i].detach(), teacher[b, i].detach()
        want += 1 - (z @ t / (z.norm() * t.norm())).item()
    assert cos(student, teacher, mask).item() == pytest.approx(want / 3, rel=1e-5)
    same = HiddenStateLoss(6, 6, "cosine")
    assert not list(same.parameters())  # equal widths: identity, nothing to learn
    assert same(teacher.detach() * 3.0, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_uniform_layer_map():
    assert uniform_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert uniform_layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]
    mapping = uniform_layer_map(16, 30)
    assert mapping[-1] == (16, 30) and len(mapping) == 16
    assert all(b > a for (_, a), (_, b) in zip(mapping, mapping[1:]))
    with pytest.raises(ValueError):
        uniform_layer_map(0, 4)
