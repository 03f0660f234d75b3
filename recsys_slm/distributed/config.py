"""The ``backend`` / ``ray.*`` keys of ``recsys-slm distill`` and ``recsys-slm teacher score``.

They sit next to a job's own keys (in the YAML file or as ``key=value`` overrides) but are not part of the job's
config dataclass: the same :class:`~recsys_slm.distill.trainer.DistillConfig` trains the same model whatever
runs it, and a checkpoint written by one backend resumes under the other. :func:`load_with_backend` splits them
off. This module imports neither Ray nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from recsys_slm.config import ConfigError, check, from_dict, load_config_data, validate_fields

C = TypeVar("C")
BACKENDS = ("local", "ray")


@dataclass
class RayConfig:
    """``ray.*`` keys (documented in ``docs/ray.md``).

    Cluster:
        address (str | None): Ray address to join; None = ``$RAY_ADDRESS`` when set, else start a local Ray.
        num_cpus (int | None): CPUs a locally started Ray offers (None = all cores). Ignored when joining.
        num_gpus (int | None): GPUs a locally started Ray offers (None = all visible).
        object_store_mb (float | None): object-store size of a locally started Ray in MiB (None = Ray's default,
            30% of RAM; at least 75). Past it Ray spills objects to ``tmp_dir``. Ignored when joining.
        storage_path (str | None): Ray Train storage (checkpoints); a local path or any pyarrow URI
            (``s3://``, ``gs://``, NFS path). None = ``<out>.ray/storage``. Must be shared by all nodes on a cluster.
        tmp_dir (Path | None): a local Ray's temp dir (session logs, sockets, spilled objects);
            None = ``<out>.ray/tmp``.
        scratch_dir (Path | None): work directories of the non-main training ranks (on each worker's node);
            None = ``<out>.ray/workers``.
        name (str | None): Ray Train run name; None = ``distill``. Rerunning with the same name and storage
            continues the run from its last checkpoint.

    Training (``distill``):
        workers (int): data-parallel training workers (one process each). Default 2.
        cpus_per_worker (float): CPUs per worker (fractions allowed). Default 1.
        use_gpu (bool): one GPU per worker (NCCL). Default False (gloo on CPU).
        comm (str): "auto" (nccl with GPUs, gloo otherwise), "gloo" or "nccl".
        max_failures (int): worker-group restarts after a worker dies (training continues from the last
            checkpoint). Default 1.
        threads (int | None): torch threads per worker; None = max(1, floor(cpus_per_worker)).

    Scoring (``teacher score``):
        actors (int | None): teacher actors; None = as many as the cluster fits (at most one per shard).
        cpus_per_actor (float): CPUs per actor. Default 1.
        gpus_per_actor (float): GPUs per actor (0 = CPU actors). Default 0.
        interactions (list[str]): interaction-log parquet files / directories / URIs to ingest into pointwise
            records before scoring (Ray Data; validated with the foundation schema); [] = score ``task``.
        history_len (int): history shown per ingested record. Default 10.
        like_threshold (float): an ingested interaction is liked when ``rating > like_threshold``. Default 3.
        on_invalid (str): "error" (raise, naming file and column) or "drop" (drop and count the bad rows).
    """

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_mb: float | None = None
    storage_path: str | None = None
    tmp_dir: Path | None = None
    scratch_dir: Path | None = None
    name: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    comm: Literal["auto", "gloo", "nccl"] = "auto"
    max_failures: int = 1
    threads: int | None = None
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    interactions: list[str] = field(default_factory=list)
    history_len: int = 10
    like_threshold: float = 3.0
    on_invalid: Literal["error", "drop"] = "error"

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        check(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        check(self.cpus_per_actor > 0, "cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")
        check(self.gpus_per_actor >= 0, "gpus_per_actor", f"must be >= 0, got {self.gpus_per_actor}")
        check(self.history_len >= 1, "history_len", f"must be >= 1, got {self.history_len}")
        for key in ("num_cpus", "actors", "threads"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, f"must be >= 1 or null, got {value}")
        check(self.num_gpus is None or self.num_gpus >= 0, "num_gpus", f"must be >= 0, got {self.num_gpus}")
        check(self.object_store_mb is None or self.object_store_mb >= 75, "object_store_mb",
              f"must be >= 75 (Ray's minimum) or null, got {self.object_store_mb}")  # fmt: skip
        check(not (self.comm == "nccl" and not self.use_gpu), "comm", "nccl needs GPUs: set ray.use_gpu=true")

    def backend_name(self) -> str:
        """The torch.distributed backend: nccl with GPUs, gloo otherwise (unless ``comm`` says)."""
        if self.comm != "auto":
            return self.comm
        return "nccl" if self.use_gpu else "gloo"


def _raw(value: Any) -> Any:
    """A command-line override's text (``_Override.raw``) or a YAML value as it is."""
    return getattr(value, "raw", value)


def load_with_backend(
    cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[C, RayConfig | None]:
    """Like :func:`recsys_slm.config.load_config`, with the ``backend`` and ``ray.*`` keys split off.

    Returns:
        tuple: the job config (``cls``) and the :class:`RayConfig` when ``backend`` is ``ray`` (else None).

    Raises:
        ConfigError: an unknown backend, ``ray.*`` keys without ``backend=ray``, or any error of ``cls``.
    """
    data, where = load_config_data(path, overrides)
    backend = str(_raw(data.pop("backend", "local")) or "local")
    ray_section = data.pop("ray", None)
    try:
        if backend not in BACKENDS:
            raise ConfigError(
                f"config key 'backend': got {backend!r}; allowed values: {', '.join(map(repr, BACKENDS))}"
            )
        if ray_section is not None and not isinstance(ray_section, dict):
            raise ConfigError(
                f"config key 'ray': expected a mapping of RayConfig fields, got {_raw(ray_section)!r}"
            )
        if backend == "local" and ray_section:
            raise ConfigError(f"config key 'ray.{sorted(ray_section)[0]}': ray.* keys need backend=ray")
        ray_cfg = from_dict(RayConfig, ray_section or {}, prefix="ray.") if backend == "ray" else None
        if ray_cfg is not None and ray_cfg.interactions and "task" in _fields(cls) and "task" not in data:
            out = data.get("out")
            if out is not None:  # ingested records land next to the output (resumable, reused)
                data["task"] = f"{_raw(out)}.records"
        return from_dict(cls, data), ray_cfg
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None


def _fields(cls: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}
