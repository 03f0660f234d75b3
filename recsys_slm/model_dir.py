"""Self-describing output directories: atomic writes and the ``recsys_slm.json`` manifest.

Every directory recsys_slm writes (a model, a prepared data set, an evaluation report) is built in a hidden
temporary sibling and renamed into place only when complete, so a crash never leaves a half-written directory
that looks finished. Model directories also carry ``recsys_slm.json``: the stage that made them, the resolved
config, the parent directory, metrics and the code version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys_slm import __version__

MANIFEST_NAME = "recsys_slm.json"
MANIFEST_VERSION = 1
# Every directory atomic_dir writes carries this empty file; only such directories (or empty ones, or ones holding
# an older recsys_slm output file) may be replaced, so a mistyped --out never deletes a user's own folder.
OUTPUT_MARKER = ".recsys_slm_output"
_OWNED_FILES = (OUTPUT_MARKER, MANIFEST_NAME, "summary.json", "report.json")


def cache_home() -> Path:
    """Root of recsys_slm's caches: ``$RECSYS_SLM_HOME``, default ``~/.cache/recsys_slm``."""
    return Path(os.environ.get("RECSYS_SLM_HOME", Path.home() / ".cache" / "recsys_slm")).expanduser()


def data_dir_or_default(data_dir: str | Path | None) -> Path:
    """``data_dir``, or the prepared MovieLens-100K default ``$RECSYS_SLM_HOME/data/movielens-100k`` when None."""
    return Path(data_dir) if data_dir is not None else cache_home() / "data" / "movielens-100k"


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block finishes without error.

    The temporary directory is a hidden sibling of ``target`` (same file system, so the final rename is
    atomic). On an exception it is deleted and ``target`` is left untouched.

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is False, is a file, or is a non-empty directory that
            recsys_slm did not write.
        ValueError: ``target`` is the file-system root, the home or current directory, or one of their parents.
    """
    target = Path(target).expanduser().resolve()
    _check_replaceable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the directory 0700; give the result the permissions a plain mkdir would (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        (tmp / OUTPUT_MARKER).touch()
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        # Move the old directory aside first: rename onto a non-empty directory is not allowed.
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(target: Path, overwrite: bool) -> None:
    protected = {Path(target.anchor), Path.home().resolve(), Path.cwd().resolve()}
    if target in protected or any(target in p.parents for p in protected):
        raise ValueError(
            f"refusing to write output to {target}: it is the root, home or current directory or contains one of "
            "them; choose a new directory for the output"
        )
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"output path {target} exists and is not a directory")
    if not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    if any(target.iterdir()) and not any((target / name).exists() for name in _OWNED_FILES):
        raise FileExistsError(
            f"refusing to replace {target}: it is not empty and was not written by recsys_slm (no "
            f"{OUTPUT_MARKER} or {MANIFEST_NAME}); remove it yourself or choose another output directory"
        )


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    # mkstemp creates 0600 files; a manifest must be as readable as the weights next to it (serving users).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def git_sha() -> str | None:
    """The git commit of the recsys_slm checkout, or None when not run from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """Package version and git commit, recorded in every manifest."""
    return {"recsys_slm": __version__, "git_sha": git_sha()}


def write_manifest(
    directory: str | Path,
    stage: str,
    config: dict[str, Any] | None = None,
    parent: str | Path | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``recsys_slm.json`` into ``directory`` and return its content.

    Args:
        directory (Path): the model / output directory (usually the temporary one from :func:`atomic_dir`).
        stage (str): what produced it, e.g. ``"import"``, ``"teacher_train"``, ``"distill"``, ``"prune"``.
        config (dict): the resolved config (see :func:`recsys_slm.config.config_to_dict`).
        parent (Path | str): the directory or model spec this one was derived from.
        metrics (dict): figures measured by the stage.
        extra (dict): stage-specific fields (e.g. source package and sha256 for imported models).
    """
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parent": str(parent) if parent is not None else None,
        "config": config or {},
        "metrics": metrics or {},
        "code_version": code_version(),
    }
    if extra:
        manifest.update(extra)
    write_json_atomic(Path(directory) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of ``directory``, or None if it has none.

    Raises:
        ValueError: the manifest exists but is not valid JSON (the message names the file).
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def config_hash(*parts: Any) -> str:
    """16 hex digits of the SHA-256 of ``parts`` as canonical JSON (the key of a resumable stage or cell)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(spec: str) -> dict[str, Any]:
    """A model's identity for hashes: a directory's resolved path, its manifest's creation time and its
    config.json's mtime (a retrained model in the same place changes it); a packaged name or hub id as given."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return {"spec": spec}
    manifest = read_manifest(path) or {}
    config = path / "config.json"
    return {
        "spec": str(path.resolve()),
        "created": manifest.get("created"),
        "config_mtime_ns": config.stat().st_mtime_ns if config.is_file() else None,
    }


def data_identity(data_dir: str | Path) -> dict[str, Any]:
    """A prepared data directory's identity: path plus the mtime of its ``summary.json`` (rewritten by every
    ``data prepare``), so re-prepared data redoes what used it."""
    summary = Path(data_dir) / "summary.json"
    return {
        "data_dir": str(data_dir),
        "summary_mtime_ns": summary.stat().st_mtime_ns if summary.is_file() else None,
    }
