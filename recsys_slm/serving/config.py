"""``ServingConfig``: the YAML that ``recsys-slm serve --config`` reads (every key is documented in docs/serving.md).

Construction only checks values; whether the model directories and the data directory exist is checked by
:func:`check_servable` when the service starts, so shipped configs that point into ``$RECSYS_SLM_HOME/runs`` load
(and are tested) on machines that have not trained those models yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from recsys_slm.config import ConfigError, check, expand_model_spec, validate_fields
from recsys_slm.data.prompts import PromptConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Manifest metrics tried, in order, as a variant's quality (higher is better); the first key that every variant
# has is used so that all variants are compared on the same figure. Dotted keys reach into nested metrics
# (``after.val_auc`` is what ``recsys-slm prune`` records).
DEFAULT_QUALITY_METRICS = ["best_val_auc", "final_val_auc", "test_auc", "after.val_auc"]


@dataclass
class VariantConfig:
    """One model the service may serve.

    Fields:
        name (str): the name responses, metrics and ``/profile`` report (letters, digits, ``_.-``). Required.
        model (str): a local ``from_pretrained`` directory with ``*.safetensors`` weights, or a packaged model
            name (``smollm2-135m-instruct``). Hub ids are refused: a service must not download at start. Required.
        quality (float | None): overrides the quality read from the model's manifest (higher is better).
        dtype (str): "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", ... Default "auto".
    """

    name: str = ""
    model: str = ""
    quality: float | None = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        validate_fields(self)
        check(bool(_NAME.match(self.name)), "name", f"must be 1-64 letters, digits, '_', '.', '-'; got {self.name!r}")
        check(bool(self.model.strip()), "model", "is required (a model directory or a packaged model name)")
        self.model = expand_model_spec(self.model)


@dataclass
class SLOConfig:
    """The latency objective the variant choice and the admission control aim at.

    Fields:
        p99_ms (float): 99th-percentile server-side latency of one /rank request. Default 500.
        candidates (int): candidates per request the objective is stated for (and profiled with). Default 50.
        concurrency (int): concurrent requests the objective must hold at (the profiled load). Default 1.
        on_miss (str): "fastest" = serve the fastest variant when none meets the SLO (``/profile`` says so);
            "error" = refuse to start. Default "fastest".
    """

    p99_ms: float = 500.0
    candidates: int = 50
    concurrency: int = 1
    on_miss: Literal["fastest", "error"] = "fastest"

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.p99_ms > 0, "p99_ms", f"must be > 0, got {self.p99_ms}")
        check(self.candidates >= 1, "candidates", f"must be >= 1, got {self.candidates}")
        check(self.concurrency >= 1, "concurrency", f"must be >= 1, got {self.concurrency}")


@dataclass
class ProfileConfig:
    """Start-up profiling of every variant on this machine.

    Fields:
        enabled (bool): profile at start; False = no measurement, the best-quality variant is served and the
            admission control starts from ``assumed_ms_per_candidate``. Default True.
        rounds (int): measured rounds of ``slo.concurrency`` requests each (p99 of few rounds ≈ their max).
            Default 10.
        warmup (int): unmeasured rounds first. Default 1.
        seed (int): seed of the synthetic requests (users and candidates drawn from the data). Default 0.
        assumed_ms_per_candidate (float): cost model used when profiling is off. Default 20.
    """

    enabled: bool = True
    rounds: int = 10
    warmup: int = 1
    seed: int = 0
    assumed_ms_per_candidate: float = 20.0

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        check(self.assumed_ms_per_candidate > 0, "assumed_ms_per_candidate", "must be > 0")


@dataclass
class BatchingConfig:
    """Dynamic batching (``@serve.batch``) and the shape of the scoring forwards.

    Fields:
        max_batch_size (int): requests merged into one scoring call. Default 8.
        batch_wait_timeout_s (float): how long the first request of a batch waits for others. Default 0.01.
        prefix_batch_size (int): user prefixes run together in one forward. Default 8.
        suffix_batch_size (int): candidate suffixes per forward (they attend to the cached prefixes). Default 32.
    """

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    prefix_batch_size: int = 8
    suffix_batch_size: int = 32

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.max_batch_size >= 1, "max_batch_size", f"must be >= 1, got {self.max_batch_size}")
        check(0 <= self.batch_wait_timeout_s <= 10, "batch_wait_timeout_s", "must be in [0, 10] seconds")
        check(self.prefix_batch_size >= 1, "prefix_batch_size", f"must be >= 1, got {self.prefix_batch_size}")
        check(self.suffix_batch_size >= 1, "suffix_batch_size", f"must be >= 1, got {self.suffix_batch_size}")


@dataclass
class OverloadConfig:
    """Bounded queueing, graceful degradation and load shedding.

    Fields:
        max_queue (int): admitted /rank requests not yet answered (queued + being scored); one more gets 503.
            Default 32.
        latency_admission (bool): predict each request's latency from the work already admitted and the
            measured cost per candidate; degrade, then shed, when the prediction exceeds
            ``headroom × slo.p99_ms``. False = only ``max_queue`` and ``degrade_at`` apply. Default True.
        headroom (float): fraction of the SLO the prediction may use. Default 0.9.
        degrade_at (int | None): with ``latency_admission: false``, the queue depth from which requests are
            degraded; None = ``max_queue // 2``. Default None.
        degrade_variant (str | None): variant used when degrading: a variant name, "auto" (the fastest profiled
            variant that is faster than the served one) or null (never switch variants). Default "auto".
        degrade_max_candidates (int | None): when degrading, score only the first N candidates (the rest come back
            unscored, after the scored ones); null = never cut candidates. Default null.
        retry_after_s (int): minimum ``Retry-After`` of a 503. Default 1.
        ewma_alpha (float): weight of the newest batch in the running cost per candidate. Default 0.2.
    """

    max_queue: int = 32
    latency_admission: bool = True
    headroom: float = 0.9
    degrade_at: int | None = None
    degrade_variant: str | None = "auto"
    degrade_max_candidates: int | None = None
    retry_after_s: int = 1
    ewma_alpha: float = 0.2

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.max_queue >= 1, "max_queue", f"must be >= 1, got {self.max_queue}")
        check(0 < self.headroom <= 1, "headroom", f"must be in (0, 1], got {self.headroom}")
        check(self.degrade_at is None or self.degrade_at >= 1, "degrade_at", "must be >= 1 or null")
        check(
            self.degrade_max_candidates is None or self.degrade_max_candidates >= 1,
            "degrade_max_candidates", "must be >= 1 or null",
        )  # fmt: skip
        check(self.retry_after_s >= 1, "retry_after_s", f"must be >= 1, got {self.retry_after_s}")
        check(0 < self.ewma_alpha <= 1, "ewma_alpha", f"must be in (0, 1], got {self.ewma_alpha}")


@dataclass
class LimitsConfig:
    """Request bounds (also published in the OpenAPI schema).

    Fields:
        max_candidates (int): candidates per /rank request. Default 100.
        max_history (int): history entries per request. Default 50.
        max_text_chars (int): characters of a candidate/history text or a profile value. Default 300.
        max_id_chars (int): characters of a user or item id. Default 64.
        max_body_bytes (int): request body size; larger bodies get 413. Default 262144.
        max_recommend (int): ``n`` of /recommend. Default 50.
    """

    max_candidates: int = 100
    max_history: int = 50
    max_text_chars: int = 300
    max_id_chars: int = 64
    max_body_bytes: int = 262144
    max_recommend: int = 50

    def __post_init__(self) -> None:
        validate_fields(self)
        for key in ("max_candidates", "max_history", "max_text_chars", "max_id_chars", "max_recommend"):
            check(1 <= getattr(self, key) <= 10_000, key, f"must be in [1, 10000], got {getattr(self, key)}")
        check(1024 <= self.max_body_bytes <= 64 * 2**20, "max_body_bytes", "must be in [1 KiB, 64 MiB]")


@dataclass
class RetrieverServingConfig:
    """The candidate generator of ``POST /recommend`` (a :mod:`recsys_slm.retriever` two-tower encoder + FAISS).

    Fields:
        encoder (str): sentence-transformers directory or packaged encoder name (``all-minilm-l6-v2``). Required.
        index (Path | None): a saved ``RetrievalIndex`` directory (``index.faiss`` + ``index.json``) built with this
            encoder and ``dim``; null = encode the catalogue and build a ``factory`` index at start. Default null.
        dim (int | None): Matryoshka dimension the encoder is truncated to (must match a saved index); null = full.
        factory (str): faiss index built at start when ``index`` is null. Default "Flat".
        texts (dict): ``RetrieverTextConfig`` keys (how users/items become texts); empty = the encoder manifest's
            training texts, else the defaults.
        exclude_seen (bool): never recommend an item of the user's logged or given history. Default True.
        nprobe (int) / ef_search (int): IVF / HNSW query-time parameters. Defaults 8 / 64.
    """

    encoder: str = ""
    index: Path | None = None
    dim: int | None = None
    factory: str = "Flat"
    texts: dict = field(default_factory=dict)
    exclude_seen: bool = True
    nprobe: int = 8
    ef_search: int = 64

    def __post_init__(self) -> None:
        validate_fields(self)
        check(bool(self.encoder.strip()), "encoder", "is required (an encoder directory or packaged name)")
        self.encoder = expand_model_spec(self.encoder)
        check(self.dim is None or self.dim >= 1, "dim", f"must be >= 1 or null, got {self.dim}")

    def text_config(self):
        """``texts`` as a :class:`recsys_slm.retriever.texts.RetrieverTextConfig` (ConfigError names the key)."""
        from recsys_slm.config import from_dict
        from recsys_slm.retriever.texts import RetrieverTextConfig

        return from_dict(RetrieverTextConfig, dict(self.texts), prefix="retriever.texts.")


@dataclass
class ServingConfig:
    """The ranking service: variants, data, SLO, batching, overload policy, limits, Ray resources.

    Fields:
        host (str): interface the HTTP proxy binds. Default "127.0.0.1" (this machine only).
        port (int): HTTP port. Default 8000.
        data_dir (Path | None): prepared data (items, users, interactions parquet); default
            ``$RECSYS_SLM_HOME/data/movielens-100k``.
        variants (list[VariantConfig]): candidate models, at least one.
        quality_metrics (list[str]): manifest metric keys tried as quality (see ``DEFAULT_QUALITY_METRICS``).
        prompt (PromptConfig): the ranker prompt; left at its defaults, each model's manifest prompt is used
            (the prompt it was trained with), as ``recsys-slm eval`` does. All variants must end up with one prompt.
        history_len (int): history items looked up for a request that gives only ``user_id``. Default 10.
        like_threshold (float): a logged interaction counts as liked when ``rating > like_threshold``. Default 3.0.
        slo / profile / batching / overload / limits: see their classes.
        device (str): "auto", "cpu", "cuda", ... Default "auto".
        torch_threads (int | None): intra-op threads of the replica; None = the CPUs Ray gives it. Default None.
        num_cpus (float): CPUs Ray reserves for the replica. Default 1.
        ray_num_cpus (int | None): CPUs of the local Ray node; None = all. Default None.
        ray_address (str | None): join this Ray cluster instead of starting a local one. Default None.
        max_ongoing_requests (int | None): Ray Serve's per-replica cap; None = max_queue + max_batch_size + 8 so
            that the service itself, not Ray's router, decides what to shed. Must be >= max_batch_size.
        request_timeout_s (float | None): Ray Serve HTTP request timeout. Default 60.
        retriever (RetrieverServingConfig | None): enables ``POST /recommend``; null = it answers 501.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path | None = None
    variants: list[VariantConfig] = field(default_factory=list)
    quality_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_QUALITY_METRICS))
    prompt: PromptConfig = field(default_factory=PromptConfig)
    history_len: int = 10
    like_threshold: float = 3.0
    slo: SLOConfig = field(default_factory=SLOConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    overload: OverloadConfig = field(default_factory=OverloadConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    device: str = "auto"
    torch_threads: int | None = None
    num_cpus: float = 1.0
    ray_num_cpus: int | None = None
    ray_address: str | None = None
    max_ongoing_requests: int | None = None
    request_timeout_s: float | None = 60.0
    retriever: RetrieverServingConfig | None = None

    def __post_init__(self) -> None:
        validate_fields(self)
        check(1 <= self.port <= 65535, "port", f"must be in [1, 65535], got {self.port}")
        check(bool(self.host.strip()), "host", "must not be empty")
        names = [v.name for v in self.variants]
        check(len(set(names)) == len(names), "variants", f"variant names must be unique, got {names}")
        check(self.history_len >= 1, "history_len", f"must be >= 1, got {self.history_len}")
        check(self.torch_threads is None or self.torch_threads >= 1, "torch_threads", "must be >= 1 or null")
        check(self.num_cpus > 0, "num_cpus", f"must be > 0, got {self.num_cpus}")
        check(bool(self.quality_metrics), "quality_metrics", "needs at least one metric key")
        dv = self.overload.degrade_variant
        check(
            dv in (None, "auto") or dv in names, "overload.degrade_variant",
            f"{dv!r} is not a variant name ({', '.join(names) or 'no variants'}), 'auto' or null",
        )  # fmt: skip
        if self.max_ongoing_requests is not None:
            check(
                self.max_ongoing_requests >= self.batching.max_batch_size, "max_ongoing_requests",
                f"must be >= batching.max_batch_size ({self.batching.max_batch_size}); Ray Serve's default of 5 "
                "silently caps @serve.batch batches",
            )  # fmt: skip

    def ongoing_requests(self) -> int:
        """Ray Serve ``max_ongoing_requests`` of the replica (see the field)."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return self.overload.max_queue + self.batching.max_batch_size + 8

    def resolved_data_dir(self) -> Path:
        from recsys_slm.model_dir import data_dir_or_default

        return data_dir_or_default(self.data_dir)


def check_servable(cfg: ServingConfig) -> None:
    """Start-time checks that need the file system: variants listed, local, safetensors-only; data present.

    Raises:
        ConfigError: no variants, a hub id, a directory without ``*.safetensors`` (or with pickled weights
            only), or a data directory without ``items.parquet`` / ``interactions.parquet``.
    """
    from recsys_slm.models.packaged import PACKAGED_MODELS

    if not cfg.variants:
        raise ConfigError("config key 'variants': list at least one model to serve")
    for i, v in enumerate(cfg.variants):
        key = f"variants[{i}].model"
        if v.model in PACKAGED_MODELS:
            continue
        path = Path(v.model).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"config key '{key}': {v.model!r} is not a directory (serving loads local safetensors "
                f"directories or packaged models: {', '.join(PACKAGED_MODELS)}; it never downloads)"
            )
        if not list(path.glob("*.safetensors")):
            raise ConfigError(f"config key '{key}': {path} has no *.safetensors weights (pickled weights are refused)")
    if cfg.retriever is not None:
        r = cfg.retriever
        if r.encoder not in PACKAGED_MODELS and not Path(r.encoder).expanduser().is_dir():
            raise ConfigError(f"config key 'retriever.encoder': {r.encoder!r} is not a directory or packaged encoder")
        if r.index is not None and not (Path(r.index) / "index.faiss").is_file():
            raise ConfigError(f"config key 'retriever.index': {r.index} holds no index.faiss (a saved RetrievalIndex)")
        r.text_config()
    data = cfg.resolved_data_dir()
    for name in ("items.parquet", "interactions.parquet"):
        if not (data / name).is_file():
            raise ConfigError(
                f"config key 'data_dir': {data / name} is missing; prepare the data first "
                "(recsys-slm data prepare --config pipelines/configs/data/movielens_100k.yaml)"
            )
