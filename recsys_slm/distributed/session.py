"""Joining or starting Ray the same way for every job, and the resource checks that keep jobs from hanging.

:func:`ray_session` joins the cluster named by ``ray.address`` / ``$RAY_ADDRESS`` (what ``ray job submit`` sets),
or starts a local Ray whose files all live under the run directory: its temp dir (session logs, sockets, spilled
objects) is ``<run>/tmp`` and the auth-token mode is ``disabled`` (Ray would otherwise write ``~/.ray/auth_token``
on first start). Unix socket paths are limited to 107 bytes, so when the run directory is deep the temp dir is
reached through a short symlink in the system temp dir, removed at shutdown (the files stay under the run dir).
Ray Data progress bars are off unless stderr is a terminal, and map UDF errors keep their type.

Resource traps (see ``docs/ray.md``): Ray waits, without an error, for resources that never come. A
``ScalingConfig`` larger than the cluster makes Ray Train retry its worker-group start forever, and on a 2-CPU
node two 1-CPU training workers leave no CPU for Ray Data's read tasks, so a trainer fed from a Ray Dataset hangs.
:func:`check_fits` turns the first into an immediate error naming the keys to change; the second cannot happen
here because training workers read their records themselves (ingestion and scoring finish before training starts).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from recsys_slm.distributed.config import RayConfig

logger = logging.getLogger(__name__)

# Longest Ray appends to the temp dir for a socket: "/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store".
_SOCKET_SUFFIX = 72
_MAX_SOCKET = 107


class RayResourceError(RuntimeError):
    """The job's resources cannot fit the Ray cluster (the message names the keys to change)."""


@dataclass
class SessionInfo:
    """How this process is attached to Ray.

    Attributes:
        address (str): the cluster address, "local" for a Ray started here, "existing" when already initialised.
        started (bool): True when this call ran ``ray.init`` (and so runs ``ray.shutdown``: stopping a local
            Ray, disconnecting from a cluster).
        tmp_dir (Path | None): the local Ray's temp dir.
        init_s (float): seconds spent in ``ray.init`` (0 when Ray was already initialised).
    """

    address: str
    started: bool
    tmp_dir: Path | None = None
    init_s: float = 0.0


def configure_ray_data() -> None:
    """Ray Data progress bars only on a terminal; a UDF's own exception raised as is (a
    :class:`~recsys_slm.data.schema.DataValidationError` keeps its type, not ``UserCodeException``)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.raise_original_map_exception = True
    interactive = sys.stderr.isatty()
    ctx.enable_progress_bars = interactive
    ctx.print_on_execution_start = interactive
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = interactive


def _short_path(tmp_dir: Path) -> tuple[Path, Path | None]:
    """``tmp_dir`` itself when Ray's socket paths under it fit 107 bytes; else a short symlink to it (in the
    system temp dir, or ``/tmp`` when that is deep too)."""
    if len(str(tmp_dir)) + _SOCKET_SUFFIX <= _MAX_SOCKET:
        return tmp_dir, None
    tag = hashlib.sha1(str(tmp_dir).encode()).hexdigest()[:10]
    for base in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        link = Path(base) / f"rsr-{tag}"
        if len(str(link)) + _SOCKET_SUFFIX <= _MAX_SOCKET and Path(base).is_dir():
            break
    else:
        raise RuntimeError(f"no short directory for Ray's sockets (paths under {tmp_dir} exceed 107 bytes): set "
                           "ray.tmp_dir to a short path")  # fmt: skip
    if link.is_symlink() and Path(os.readlink(link)) != tmp_dir:
        link.unlink()
    if not link.is_symlink():
        if link.exists():
            raise RuntimeError(f"{link} exists and is not a symlink: set ray.tmp_dir to a short path")
        link.symlink_to(tmp_dir, target_is_directory=True)
    return link, link


@contextlib.contextmanager
def ray_session(cfg: RayConfig, run_dir: Path) -> Iterator[SessionInfo]:
    """Attach to Ray for the duration of the block (see the module docstring).

    Args:
        cfg (RayConfig): ``address``, ``num_cpus``, ``num_gpus``, ``tmp_dir``.
        run_dir (Path): the job's run directory (``<out>.ray``); a local Ray's temp dir defaults to ``run_dir/tmp``.

    Yields:
        SessionInfo: the address and whether this process started Ray.
    """
    import time

    import ray

    if ray.is_initialized():
        configure_ray_data()
        yield SessionInfo(address="existing", started=False)
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    link = None
    start = time.perf_counter()
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        info = SessionInfo(address=address, started=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else the first start writes ~/.ray/auth_token
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        tmp_dir = Path(cfg.tmp_dir or (run_dir / "tmp")).expanduser().resolve()
        tmp_dir.mkdir(parents=True, exist_ok=True)
        ray_tmp, link = _short_path(tmp_dir)
        ray.init(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=int(cfg.object_store_mb * 2**20) if cfg.object_store_mb else None,
            _temp_dir=str(ray_tmp),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        info = SessionInfo(address="local", started=True, tmp_dir=tmp_dir)
    info.init_s = round(time.perf_counter() - start, 2)
    configure_ray_data()
    try:
        yield info
    finally:
        ray.shutdown()
        if link is not None:
            with contextlib.suppress(OSError):
                link.unlink()


def cluster_totals() -> dict[str, float]:
    """Total CPU and GPU of the alive nodes."""
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}


def check_fits(what: str, count: int, cpus: float, gpus: float, keys: str, reserve_cpus: float = 0.0) -> None:
    """Raise :class:`RayResourceError` unless ``count`` processes of ``cpus``/``gpus`` each fit the cluster.

    Args:
        what (str): e.g. "training workers".
        count (int): how many processes.
        cpus / gpus (float): per process.
        keys (str): the config keys to name in the message.
        reserve_cpus (float): CPUs that must stay free (Ray Data read tasks running beside the processes).
    """
    total = cluster_totals()
    need_cpu = count * cpus + reserve_cpus
    if need_cpu > total["CPU"] + 1e-9:
        reserve = f" + {reserve_cpus:g} CPU kept free for Ray Data" if reserve_cpus else ""
        raise RayResourceError(
            f"{count} {what} × {cpus:g} CPU{reserve} = {need_cpu:g} CPUs, but the Ray cluster has {total['CPU']:g}: "
            f"lower {keys} (fractions such as 0.5 are allowed) or add nodes; Ray would otherwise wait forever"
        )
    if count * gpus > total["GPU"] + 1e-9:
        raise RayResourceError(
            f"{count} {what} × {gpus:g} GPU = {count * gpus:g} GPUs, but the Ray cluster has {total['GPU']:g}: "
            f"lower {keys} or run on CPU"
        )


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The user's own exception inside a Ray task / actor / Train error chain, else ``exc`` itself.

    Ray re-raises a remote error wrapped (``RayTaskError``, ``UserCodeException``, ``WorkerGroupError``); the CLI
    reports user-fixable errors by type (config, data, missing file), so the original is what it needs. A
    :class:`~recsys_slm.data.schema.DataValidationError` is rebuilt from its problems (its message does not
    survive pickling).
    """
    from recsys_slm.data.schema import DataValidationError

    queue, seen = [exc], set()
    while queue:
        err = queue.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if not type(err).__module__.startswith("ray."):
            if isinstance(err, DataValidationError):
                return DataValidationError(err.problems)
            return err
        # Explicit causes only: __context__ holds whatever Ray's own code was handling (e.g. StopIteration).
        queue += [getattr(err, "cause", None), getattr(err, "controller_failure", None), err.__cause__]
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            queue += [failures[k] for k in sorted(failures)]
    return exc
