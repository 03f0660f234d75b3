"""Every YAML config shipped under pipelines/, eval/ and serving/ loads into its dataclass."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_slm.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _config_classes():
    from pipelines.quickstart import QuickstartConfig
    from recsys_slm.compress.config import CompressConfig
    from recsys_slm.data.prepare import DataPrepareConfig
    from recsys_slm.distill.trainer import DistillConfig
    from recsys_slm.evaluation.ranker_eval import RankerEvalConfig
    from recsys_slm.prune.pruner import PruneConfig
    from recsys_slm.ranker.train import TeacherTrainConfig

    # folder name under */configs/ -> the dataclass its YAML files load into
    return {
        "quickstart": QuickstartConfig,
        "data": DataPrepareConfig,
        "teacher": TeacherTrainConfig,
        "ranker": RankerEvalConfig,
        "distill": DistillConfig,
        "prune": PruneConfig,
        "configs": __import__("recsys_slm.serving.config", fromlist=["_"]).ServingConfig,  # serving/configs/*.yaml
        "compress": CompressConfig,
        "retriever": __import__("recsys_slm.retriever.train", fromlist=["_"]).RetrieverTrainConfig,
    }


def _yaml_files():
    return sorted(p for folder in ("pipelines", "eval", "serving") for p in (ROOT / folder).rglob("*.yaml"))


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads(path):
    classes = _config_classes()
    kind = path.parent.name
    assert kind in classes, f"{path}: no config class registered for folder '{kind}' in this test"
    load_config(classes[kind], path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path}: the first line must be a comment giving the command that runs it"


def test_movielens_prompt_is_the_same_everywhere():
    """The teacher is trained, evaluated and demoed with one prompt; a drift between YAMLs would silently
    evaluate a model on prompts it was not trained on."""
    import yaml

    files = [
        "pipelines/configs/quickstart/smollm2_movielens.yaml",
        "pipelines/configs/teacher/smollm2_movielens.yaml",
        "pipelines/configs/teacher/qwen_coder_movielens.yaml",
        "eval/configs/ranker/smollm2_movielens.yaml",
    ]
    blocks = {f: yaml.safe_load((ROOT / f).read_text())["prompt"] for f in files}
    first = blocks[files[0]]
    for f, block in blocks.items():
        assert block == first, f"{f}: prompt block differs from {files[0]}"
