"""Retriever distillation losses pinned against naive float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys_slm.retriever.losses import (
    ListwiseKLLoss,
    LogQCorrectedMNRLoss,
    RetrieverDistillLoss,
    inbatch_margin_mse,
    listwise_kl,
    logq_inbatch_ce,
)


def _unit(rng, b, d):
    x = rng.standard_normal((b, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _naive_listwise_kl(su, si, tu, ti, tau_s, tau_t):
    """Loops in Python floats (float64): mean_b sum_j p_bj (log p_bj - log q_bj)."""
    b = len(su)
    tu = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in tu]
    ti = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in ti]
    total = 0.0
    for r in range(b):
        s = [sum(x * y for x, y in zip(su[r], si[j], strict=True)) / tau_s for j in range(b)]
        t = [sum(x * y for x, y in zip(tu[r], ti[j], strict=True)) / tau_t for j in range(b)]
        zs = math.log(sum(math.exp(v) for v in s))
        zt = math.log(sum(math.exp(v) for v in t))
        total += sum(math.exp(t[j] - zt) * ((t[j] - zt) - (s[j] - zs)) for j in range(b))
    return total / b


def _naive_margin_mse(su, si, tu, ti):
    b = len(su)
    tu = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in tu]
    ti = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in ti]

    def dot(a, c):
        return sum(x * y for x, y in zip(a, c, strict=True))

    errs = []
    for r in range(b):
        for j in range(b):
            if j != r:
                ms = dot(su[r], si[r]) - dot(su[r], si[j])
                mt = dot(tu[r], ti[r]) - dot(tu[r], ti[j])
                errs.append((ms - mt) ** 2)
    return sum(errs) / len(errs)


def _naive_logq_ce(u, i, log_q, scale):
    """Loops in Python floats: mean_b −log(exp(l_bb) / Σ_j exp(l_bj)), l_bj = scale·cos(u_b, i_j) − log q_j."""

    def cos(a, c):
        return sum(x * y for x, y in zip(a, c, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in c)
        )

    total = 0.0
    for b in range(len(u)):
        logits = [scale * cos(u[b], i[j]) - log_q[j] for j in range(len(i))]
        total -= logits[b] - math.log(sum(math.exp(v) for v in logits))
    return total / len(u)


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_logq_inbatch_ce_matches_naive_reference_and_reduces_to_mnrl(scale):
    rng = np.random.default_rng(3)
    u, i = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))  # unnormalised: the loss normalises
    log_q = np.log(np.array([0.4, 0.1, 0.05, 0.3, 0.15]))
    ref = _naive_logq_ce(u.tolist(), i.tolist(), log_q.tolist(), scale)
    t = [torch.tensor(a, dtype=torch.float64) for a in (u, i, log_q)]
    assert logq_inbatch_ce(t[0], t[1], t[2], scale).item() == pytest.approx(ref, abs=1e-12)
    # a uniform q shifts every logit equally: plain in-batch CE (MNRL)
    uniform = torch.full((5,), math.log(0.2), dtype=torch.float64)
    plain = F.cross_entropy(scale * F.normalize(t[0], dim=-1) @ F.normalize(t[1], dim=-1).T, torch.arange(5))
    assert logq_inbatch_ce(t[0], t[1], uniform, scale).item() == pytest.approx(plain.item(), abs=1e-12)
    assert ref != pytest.approx(plain.item())  # a skewed q does change it


@pytest.mark.parametrize("tau_s,tau_t", [(0.05, None), (0.1, 0.03), (1.0, 2.0)])
def test_listwise_kl_matches_naive_reference(tau_s, tau_t):
    rng = np.random.default_rng(0)
    su, si = _unit(rng, 6, 8), _unit(rng, 6, 8)
    tu, ti = rng.standard_normal((6, 12)), rng.standard_normal((6, 12))  # unnormalised, wider teacher
    ref = _naive_listwise_kl(su.tolist(), si.tolist(), tu.tolist(), ti.tolist(), tau_s, tau_t or tau_s)
    t = [torch.tensor(a, dtype=torch.float64) for a in (su, si, tu, ti)]
    assert listwise_kl(*t, temperature=tau_s, teacher_temperature=tau_t).item() == pytest.approx(
        ref, abs=1e-10
    )
    t32 = [x.float() for x in t]
    assert listwise_kl(*t32, temperature=tau_s, teacher_temperature=tau_t).item() == pytest.approx(
        ref, rel=1e-4, abs=1e-5
    )


def test_listwise_kl_is_zero_when_student_equals_teacher_and_has_gradients():
    rng = np.random.default_rng(1)
    u, i = (torch.tensor(_unit(rng, 5, 4)) for _ in range(2))
    assert listwise_kl(u, i, u, i).item() == pytest.approx(0.0, abs=1e-12)
    su = u.clone().requires_grad_(True)
    loss = listwise_kl(su, i.flip(0), u, i)
    loss.backward()
    assert loss.item() > 0 and su.grad is not None and su.grad.abs().sum() > 0


def test_inbatch_margin_mse_matches_naive_reference():
    rng = np.random.default_rng(2)
    su, si = _unit(rng, 5, 6), _unit(rng, 5, 6)
    tu, ti = rng.standard_normal((5, 9)), rng.standard_normal((5, 9))
    ref = _naive_margin_mse(su.tolist(), si.tolist(), tu.tolist(), ti.tolist())
    t = [torch.tensor(a, dtype=torch.float64) for a in (su, si, tu, ti)]
    assert inbatch_margin_mse(*t).item() == pytest.approx(ref, abs=1e-12)


def test_loss_modules_on_a_tiny_encoder(tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_encoder_dir), device="cpu")
    anchors = ["liked toy story and heat", "liked alien", "disliked fargo", "liked casablanca"]
    items = ["toy story (1995), drama", "alien (1979), horror", "babe (1995), comedy", "heat (1995), action"]
    feats = [model.preprocess(anchors), model.preprocess(items)]
    with torch.no_grad():
        u = model.encode(anchors, convert_to_tensor=True, normalize_embeddings=True)
        i = model.encode(items, convert_to_tensor=True, normalize_embeddings=True)
    torch.manual_seed(0)
    teacher = torch.randn(4, 2, 96)
    module = ListwiseKLLoss(model, temperature=0.1)
    model.eval()  # no dropout: the module's forward must see the same embeddings as encode()
    got = module([dict(f) for f in feats], teacher)
    want = listwise_kl(u, i, teacher[:, 0], teacher[:, 1], 0.1)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)

    combined = RetrieverDistillLoss(
        model, teacher[:, 0], teacher[:, 1], embedding_loss="mse", score_loss="listwise_kl", temperature=0.1,
        label_weight=0.5, matryoshka_dims=[64, 16],
    )  # fmt: skip
    assert combined.projection is not None and combined.projection.in_features == 64
    assert combined.projection.out_features == 96
    parts = combined([dict(f) for f in feats], torch.arange(4))
    assert set(parts) == {"embedding", "score", "contrastive"}
    want_score = sum(
        listwise_kl(
            F.normalize(u[:, :d], dim=-1), F.normalize(i[:, :d], dim=-1), teacher[:, 0], teacher[:, 1], 0.1
        )
        for d in (64, 16)
    )
    assert parts["score"].item() == pytest.approx(want_score.item(), abs=1e-5)
    logits = 20.0 * u @ i.T
    want_ce = F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(
        20.0 * F.normalize(u[:, :16], dim=-1) @ F.normalize(i[:, :16], dim=-1).T, torch.arange(4)
    )
    assert parts["contrastive"].item() == pytest.approx(0.5 * want_ce.item(), abs=1e-4)
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.2, 0.1]))
    corrected = RetrieverDistillLoss(
        model, teacher[:, 0], teacher[:, 1], embedding_loss="none", score_loss="none", label_weight=0.5,
        matryoshka_dims=[64, 16], log_q=log_q,
    )([dict(f) for f in feats], torch.tensor([0, 1, 2, 3]))  # fmt: skip
    want_q = sum(
        logq_inbatch_ce(F.normalize(u[:, :d], dim=-1), F.normalize(i[:, :d], dim=-1), log_q, 20.0) for d in (64, 16)
    )
    assert set(corrected) == {"contrastive"}
    assert corrected["contrastive"].item() == pytest.approx(0.5 * want_q.item(), abs=1e-4)
    model.eval()
    got = LogQCorrectedMNRLoss(model, scale=20.0)([dict(f) for f in feats], log_q)
    assert got.item() == pytest.approx(logq_inbatch_ce(u, i, log_q, 20.0).item(), abs=1e-5)
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    ladder = MatryoshkaLoss(model, LogQCorrectedMNRLoss(model, scale=20.0), [64, 16])
    want = logq_inbatch_ce(u, i, log_q, 20.0) + logq_inbatch_ce(u[:, :16], i[:, :16], log_q, 20.0)
    assert ladder([dict(f) for f in feats], log_q).item() == pytest.approx(want.item(), abs=1e-4)
    with pytest.raises(ValueError, match="must lie in 1..64"):
        RetrieverDistillLoss(model, teacher[:, 0], teacher[:, 1], matryoshka_dims=[128])
