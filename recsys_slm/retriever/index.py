"""FAISS item indexes for the retriever: built from ``index_factory`` strings, saved with their metadata.

Every index is inner product over L2-normalised vectors (= cosine similarity, what the sentence encoders are
trained for). Supported factory strings (anything else faiss' ``index_factory`` accepts is passed through):

=====================  ==================================================================================
``Flat``               exact search (the reference for ANN recall)
``HNSW{M}``            graph search, e.g. ``HNSW32``; query-time ``efSearch`` (``ef_search``)
``IVF{nlist},Flat``    inverted lists over ``nlist`` k-means cells; query-time ``nprobe``
``IVF{nlist},PQ{m}``   IVF + product quantisation to ``m`` sub-codes of ``nbits`` (``PQ{m}x{nbits}``, default 8)
``PQ{m}``, ``SQ8``     product / 8-bit scalar quantisation, exhaustive scan
=====================  ==================================================================================

Training (IVF centroids, PQ codebooks, SQ ranges) uses the item vectors themselves. Sizes are checked first so a
catalogue too small for the requested structure fails with a message saying what to change, not a faiss assert.

Saved layout (``save``): ``DIR/index.faiss`` (``faiss.write_index``) and ``DIR/index.json`` — format version,
factory string, metric, dimension, number of vectors, the item id of every row (row ``i`` of the index is
``item_ids[i]``), the encoder it was built with (directory, manifest fingerprint, embedding dimension, the
``truncate_dim`` used) and the query-time parameters. :meth:`RetrievalIndex.load` given the encoder refuses an
index built with another encoder or dimension.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys_slm.model_dir import MANIFEST_NAME, atomic_dir, code_version, write_json_atomic

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
INDEX_FORMAT_VERSION = 1
METRIC = "inner_product"

_IVF = re.compile(r"IVF(\d+)")
_PQ = re.compile(r"PQ(\d+)(?:x(\d+))?")


class IndexMismatchError(ValueError):
    """A saved index does not belong to the encoder (or dimension) it is loaded with."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, contiguous); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def check_factory(factory: str, dim: int, n_train: int) -> None:
    """Raise ValueError with a fix when ``factory`` cannot be trained on ``n_train`` vectors of ``dim`` dims.

    Rules: IVF needs at least ``nlist`` training vectors (faiss' k-means; it warns below ``39 * nlist``); PQ needs
    ``dim % m == 0`` and at least ``2**nbits`` training vectors (one k-means per sub-quantiser).
    """
    if not factory or not factory.strip():
        raise ValueError("empty index factory string; use e.g. Flat, HNSW32, IVF64,Flat, IVF64,PQ16, SQ8")
    ivf = _IVF.search(factory)
    if ivf:
        nlist = int(ivf.group(1))
        if nlist < 1:
            raise ValueError(f"index {factory!r}: IVF needs nlist >= 1")
        if n_train < nlist:
            hint = max(1, int(np.sqrt(n_train)))
            raise ValueError(
                f"index {factory!r} needs at least {nlist} training vectors for its {nlist} IVF cells but there "
                f"are only {n_train} items; use fewer cells (e.g. IVF{hint},...: about sqrt(#items)), or Flat / "
                "HNSW32 / SQ8 for a catalogue this small"
            )
    pq = _PQ.search(factory.replace("IVF", "_"))
    if pq:
        m = int(pq.group(1))
        nbits = int(pq.group(2) or 8)
        if m < 1 or dim % m:
            divisors = [k for k in (4, 8, 16, 32, 48, 64, 96) if k <= dim and dim % k == 0]
            raise ValueError(
                f"index {factory!r}: PQ{m} splits each vector into {m} sub-vectors, so the dimension ({dim}) must "
                f"be a multiple of {m}; use one of PQ{', PQ'.join(map(str, divisors)) or '1'}"
            )
        need = 2**nbits
        if n_train < need:
            fit = max(1, int(np.floor(np.log2(max(n_train, 1)))))
            raise ValueError(
                f"index {factory!r} needs at least {need} training vectors ({need} centroids per sub-quantiser at "
                f"{nbits} bits) but there are only {n_train} items; use fewer bits (PQ{m}x{fit} needs {2**fit}), "
                "or SQ8 / Flat for a catalogue this small"
            )


def _faiss():
    import faiss

    return faiss


def set_search_params(index: Any, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
    """Set IVF ``nprobe`` / HNSW ``efSearch`` where the index has them; returns what was set."""
    faiss = _faiss()
    done: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
        done["nprobe"] = int(ivf.nprobe)
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None and ef_search is not None:
        hnsw.efSearch = int(ef_search)
        done["ef_search"] = int(ef_search)
    return done


def code_bytes_per_vector(index: Any) -> float:
    """Per-vector storage of ``index``, excluding shared structures (centroids, codebooks) that do not grow with
    the catalogue: the code size, plus the 8-byte id of an IVF list entry, plus the neighbour links of HNSW."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return float(ivf.code_size + 8)
    if hasattr(index, "hnsw"):
        n = max(index.ntotal, 1)
        links = faiss.vector_to_array(index.hnsw.neighbors).nbytes / n
        storage = faiss.downcast_index(index.storage)
        return float(storage.sa_code_size() + links)
    return float(index.sa_code_size())


def encoder_fingerprint(model_dir: str | Path | None) -> str | None:
    """sha256 of the encoder directory's ``recsys_slm.json`` (the manifest records stage, config and creation
    time, so two training runs differ and a copy of one directory matches), else of its ``config.json`` +
    ``modules.json`` + weight file sizes; None when there is no directory."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    root = Path(model_dir)
    h = hashlib.sha256()
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        h.update(manifest.read_bytes())
        return h.hexdigest()
    for name in ("config.json", "modules.json", "config_sentence_transformers.json"):
        if (root / name).is_file():
            h.update((root / name).read_bytes())
    for weights in sorted(root.rglob("*.safetensors")):
        h.update(f"{weights.relative_to(root)}:{weights.stat().st_size}".encode())
    return h.hexdigest()


def _manifest_summary(model_dir: str | Path | None) -> dict[str, Any] | None:
    if model_dir is None:
        return None
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return {"stage": m.get("stage"), "created": m.get("created")}


@dataclass
class RetrievalIndex:
    """A FAISS index over item vectors plus the metadata needed to use it safely.

    Attributes:
        index: the faiss index (row ``i`` = ``item_ids[i]``).
        item_ids (list[str]): item id of every row.
        factory (str): the ``index_factory`` string.
        dim (int): vector dimension.
        meta (dict): encoder info, search params, build time (see the module docstring).
    """

    index: Any
    item_ids: list[str]
    factory: str
    dim: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        item_ids: list[str],
        factory: str = "Flat",
        *,
        encoder_dir: str | Path | None = None,
        embedding_dim: int | None = None,
        nprobe: int | None = 8,
        ef_search: int | None = 64,
        seed: int = 0,
    ) -> RetrievalIndex:
        """Normalise ``vectors`` (N, d), train the index on them if needed, add them.

        Args:
            vectors (np.ndarray (N, d)): item embeddings (any norm; normalised here).
            item_ids (list[str]): N item ids, unique.
            factory (str): faiss ``index_factory`` string, built with ``METRIC_INNER_PRODUCT``.
            encoder_dir: the encoder directory the vectors came from (recorded; checked by :meth:`load`).
            embedding_dim (int | None): the encoder's full output dimension (d is smaller when truncated).
            nprobe, ef_search: query-time IVF / HNSW parameters (ignored by other indexes).
            seed (int): k-means seed for IVF/PQ training.

        Raises:
            ValueError: bad shapes, duplicate ids, or a factory the catalogue is too small for (with the fix).
        """
        faiss = _faiss()
        x = l2_normalize(np.asarray(vectors))
        if x.ndim != 2 or x.shape[0] != len(item_ids):
            raise ValueError(f"vectors have shape {x.shape} for {len(item_ids)} item ids; expected (N, d)")
        if len(set(map(str, item_ids))) != len(item_ids):
            raise ValueError("item ids must be unique")
        n, d = x.shape
        check_factory(factory, d, n)
        start = time.perf_counter()
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"faiss cannot build index {factory!r} for dimension {d}: {exc}") from None
        _configure_training(index, seed)
        if not index.is_trained:
            index.train(x)
        index.add(x)
        params = set_search_params(index, nprobe, ef_search)
        build_s = time.perf_counter() - start
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "factory": factory,
            "metric": METRIC,
            "normalized": True,
            "dim": d,
            "ntotal": n,
            "encoder": {
                "model_dir": str(Path(encoder_dir).resolve()) if encoder_dir is not None else None,
                "fingerprint": encoder_fingerprint(encoder_dir),
                "manifest": _manifest_summary(encoder_dir),
                "embedding_dim": embedding_dim,
                "truncate_dim": d if embedding_dim is not None and d < embedding_dim else None,
            },
            "search_params": params,
            "training_notes": training_notes(factory, n),
            "build_seconds": build_s,
            "code_bytes_per_vector": code_bytes_per_vector(index),
            "serialized_bytes": int(faiss.serialize_index(index).nbytes),
        }
        return cls(index, [str(i) for i in item_ids], factory, d, meta)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product of normalised queries.

        Returns:
            tuple: scores (Q, k) float32 and rows (Q, k) int64 into ``item_ids`` (-1 where fewer than k exist).
        """
        q = l2_normalize(np.asarray(queries))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        return self.index.search(q, int(min(k, self.ntotal)))

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` + ``index.json`` into ``directory`` (atomically replaced)."""
        faiss = _faiss()
        meta = dict(
            self.meta, item_ids=self.item_ids, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
        meta["code_version"] = code_version()
        with atomic_dir(directory) as tmp:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            write_json_atomic(tmp / META_FILE, meta)
        return Path(directory)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        encoder_dir: str | Path | None = None,
        dim: int | None = None,
    ) -> RetrievalIndex:
        """Read a saved index; with ``encoder_dir`` / ``dim`` check it belongs to that encoder and dimension.

        Raises:
            FileNotFoundError: ``index.faiss`` or ``index.json`` missing.
            IndexMismatchError: the index was built with another encoder (manifest fingerprint differs) or
                another dimension; the message names both and says to rebuild.
        """
        faiss = _faiss()
        directory = Path(directory)
        for name in (INDEX_FILE, META_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} does not exist; not a saved retrieval index")
        meta = json.loads((directory / META_FILE).read_text())
        built = meta.get("encoder") or {}
        if encoder_dir is not None:
            mine = encoder_fingerprint(encoder_dir)
            if built.get("fingerprint") is None or mine != built.get("fingerprint"):
                theirs = built.get("manifest") or {}
                ours = _manifest_summary(encoder_dir) or {}
                raise IndexMismatchError(
                    f"index {directory} was built with encoder {built.get('model_dir')} (stage "
                    f"{theirs.get('stage')}, created {theirs.get('created')}) but is being loaded for encoder "
                    f"{Path(encoder_dir).resolve()} (stage {ours.get('stage')}, created {ours.get('created')}); "
                    "their embeddings are not comparable: rebuild the index with this encoder "
                    "(recsys-slm eval retrieval ... or RetrievalIndex.build) or load the encoder it was built with"
                )
        if dim is not None and int(dim) != int(meta["dim"]):
            raise IndexMismatchError(
                f"index {directory} holds {meta['dim']}-d vectors (truncate_dim {built.get('truncate_dim')}) but the "
                f"encoder is used at {dim} dims; load the encoder with truncate_dim={meta['dim']} or rebuild the index"
            )
        index = faiss.read_index(str(directory / INDEX_FILE))
        if index.d != int(meta["dim"]) or index.ntotal != len(meta["item_ids"]):
            raise ValueError(
                f"{directory}: index.faiss ({index.ntotal} x {index.d}) does not match index.json "
                f"({len(meta['item_ids'])} ids x {meta['dim']})"
            )
        item_ids = [str(i) for i in meta.pop("item_ids")]
        return cls(index, item_ids, meta["factory"], int(meta["dim"]), meta)


def _configure_training(index: Any, seed: int) -> None:
    """Seed IVF k-means explicitly, and switch off PQ polysemous training: it only serves Hamming-threshold
    search (``polysemous_ht``), which is not used here, and costs ~10-40x the PQ training time itself."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(ivf, "cp"):
        ivf.cp.seed = int(seed)
        ivf.cp.min_points_per_centroid = 1  # size is checked (and noted) by check_factory / training_notes
    for sub in (faiss.downcast_index(index), ivf):
        if sub is None:
            continue
        if hasattr(sub, "do_polysemous_training"):
            sub.do_polysemous_training = False
        pq = getattr(sub, "pq", None)
        if pq is not None and hasattr(pq, "cp"):
            pq.cp.seed = int(seed)
            pq.cp.min_points_per_centroid = 1  # no stderr warning per sub-quantiser; noted in meta instead


def training_notes(factory: str, n_train: int) -> list[str]:
    """faiss recommends >= 39 training vectors per k-means centroid; say when a structure is trained on fewer."""
    notes = []
    ivf = _IVF.search(factory)
    if ivf and n_train < 39 * int(ivf.group(1)):
        notes.append(f"IVF{ivf.group(1)} trained on {n_train} vectors (< 39 per cell; clustering is rough)")
    pq = _PQ.search(factory.replace("IVF", "_"))
    if pq and n_train < 39 * 2 ** int(pq.group(2) or 8):
        k = 2 ** int(pq.group(2) or 8)
        notes.append(f"PQ codebooks ({k} centroids) trained on {n_train} vectors (< 39 per centroid)")
    return notes
