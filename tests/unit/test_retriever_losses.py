"""Retriever distillation losses pinned against naive float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys_slm.retriever.losses import ListwiseKLLoss, RetrieverDistillLoss, inbatch_margin_mse, listwise_kl


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
    with pytest.raises(ValueError, match="must lie in 1..64"):
        RetrieverDistillLoss(model, teacher[:, 0], teacher[:, 1], matryoshka_dims=[128])
