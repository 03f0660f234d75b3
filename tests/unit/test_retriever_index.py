"""FAISS retrieval indexes: exactness of Flat, clear size errors, save/load with metadata, mismatch refusal; and
the target-rank helpers of the retrieval eval against candidate_ranks."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_slm.metrics.ranking import candidate_ranks
from recsys_slm.model_dir import write_manifest
from recsys_slm.retriever.evaluate import exact_target_ranks, exclusion_mask, ranks_from_search
from recsys_slm.retriever.index import IndexMismatchError, RetrievalIndex, check_factory, l2_normalize


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    items = l2_normalize(rng.standard_normal((600, 32)))
    queries = l2_normalize(rng.standard_normal((40, 32)))
    return items, queries, [f"i{j}" for j in range(600)]


def test_flat_recall_against_brute_force_is_one(vectors):
    items, queries, ids = vectors
    index = RetrievalIndex.build(items, ids, "Flat")
    k = 25
    scores, rows = index.search(queries, k)
    brute = np.argsort(-(queries @ items.T), axis=1)[:, :k]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, brute, strict=True)])
    assert recall == 1.0
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ items.T, rows, axis=1), atol=1e-5)
    assert index.meta["code_bytes_per_vector"] == 4 * 32 and index.meta["metric"] == "inner_product"


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat", "IVF16,PQ8", "SQ8"])
def test_ann_indexes_build_and_mostly_agree(vectors, factory):
    items, queries, ids = vectors
    index = RetrievalIndex.build(items, ids, factory, nprobe=16, ef_search=128)
    _, rows = index.search(queries, 10)
    brute = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, brute, strict=True)])
    assert recall >= (0.5 if "PQ" in factory else 0.9)
    assert index.meta["code_bytes_per_vector"] < (
        4 * 32 + 8 if "PQ" in factory or "SQ" in factory else 10_000
    )
    if factory == "IVF16,PQ8":  # 600 vectors: < 39 per IVF cell and per PQ centroid, said in the metadata
        assert index.meta["training_notes"] == [
            "IVF16 trained on 600 vectors (< 39 per cell; clustering is rough)",
            "PQ codebooks (256 centroids) trained on 600 vectors (< 39 per centroid)",
        ]


def test_too_few_vectors_and_bad_pq_give_clear_errors(vectors):
    items, _, ids = vectors
    with pytest.raises(
        ValueError,
        match=r"'IVF1024,Flat' needs at least 1024 training vectors .* only 600 items; use fewer cells \(e.g. IVF24",
    ):
        RetrievalIndex.build(items, ids, "IVF1024,Flat")
    with pytest.raises(
        ValueError,
        match=r"PQ7 splits .* dimension \(32\) must be a multiple of 7; use one of PQ4, PQ8, PQ16, PQ32",
    ):
        RetrievalIndex.build(items, ids, "IVF8,PQ7")
    with pytest.raises(
        ValueError,
        match=r"'PQ8' needs at least 256 training vectors .* only 100 items; use fewer bits \(PQ8x6",
    ):
        RetrievalIndex.build(items[:100], ids[:100], "PQ8")
    with pytest.raises(ValueError, match="faiss cannot build index 'Bogus7'"):
        RetrievalIndex.build(items, ids, "Bogus7")
    check_factory("IVF8,PQ8x4", 32, 16)  # 8 cells and 16 centroids fit 16 vectors
    with pytest.raises(ValueError, match="item ids must be unique"):
        RetrievalIndex.build(items[:2], ["a", "a"], "Flat")


def test_save_load_roundtrip_and_mismatch_refused(vectors, tmp_path):
    items, queries, ids = vectors
    enc_a, enc_b = tmp_path / "enc_a", tmp_path / "enc_b"
    for d, seed in ((enc_a, 0), (enc_b, 1)):
        d.mkdir()
        write_manifest(d, "retriever_train", config={"seed": seed})
    index = RetrievalIndex.build(
        items[:, :16], ids, "HNSW32", encoder_dir=enc_a, embedding_dim=32, ef_search=99
    )
    index.save(tmp_path / "idx")
    copy_of_a = tmp_path / "copy_a"
    copy_of_a.mkdir()
    (copy_of_a / "recsys_slm.json").write_bytes((enc_a / "recsys_slm.json").read_bytes())

    loaded = RetrievalIndex.load(tmp_path / "idx", encoder_dir=copy_of_a, dim=16)
    assert loaded.item_ids == ids and loaded.dim == 16 and loaded.factory == "HNSW32"
    assert loaded.meta["encoder"]["truncate_dim"] == 16 and loaded.meta["encoder"]["embedding_dim"] == 32
    np.testing.assert_array_equal(loaded.search(queries[:, :16], 5)[1], index.search(queries[:, :16], 5)[1])

    with pytest.raises(
        IndexMismatchError,
        match="was built with encoder .*enc_a.* but is being loaded for encoder .*enc_b.*rebuild the index",
    ):
        RetrievalIndex.load(tmp_path / "idx", encoder_dir=enc_b)
    with pytest.raises(
        IndexMismatchError,
        match="holds 16-d vectors .* used at 32 dims; load the encoder with truncate_dim=16",
    ):
        RetrievalIndex.load(tmp_path / "idx", encoder_dir=enc_a, dim=32)
    with pytest.raises(FileNotFoundError, match="not a saved retrieval index"):
        RetrievalIndex.load(tmp_path / "enc_a")


def test_target_ranks_follow_the_tie_rule():
    rng = np.random.default_rng(3)
    ids = ["10", "9", "8", "77", "1", "100", "2", "3"]
    scores = rng.integers(0, 3, size=(30, len(ids))).astype(np.float64)  # many ties
    targets = [ids[j] for j in rng.integers(0, len(ids), size=30)]
    exclude = [set(rng.choice(ids, size=3, replace=False)) - {t} for t in targets]
    got = exact_target_ranks(scores, ids, targets, exclusion_mask(exclude, ids))
    for q, t in enumerate(targets):
        keep = [j for j, i in enumerate(ids) if i not in exclude[q]]
        kept_ids = [ids[j] for j in keep]
        ranks = candidate_ranks(scores[q, keep], kept_ids)
        assert got[q] == ranks[kept_ids.index(t)]
    # ranks_from_search on a full (unordered) result list gives the same ranks, inf beyond k_max
    rows = np.tile(np.arange(len(ids)), (30, 1))
    r_search, top, _ = ranks_from_search(scores, rows, ids, exclude, targets, k_max=3)
    np.testing.assert_array_equal(r_search, np.where(got <= 3, got, np.inf))
    assert all(len(t) == 3 and not set(t) & ex for t, ex in zip(top, exclude, strict=True))
