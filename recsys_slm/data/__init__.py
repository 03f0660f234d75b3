"""Data layer: the interaction-log schema, MovieLens-100K importers and task builders.

* :mod:`recsys_slm.data.schema`: parquet tables (interactions, items, users), :func:`validate_log`,
  :class:`InteractionLog`, :class:`DataValidationError`.
* :mod:`recsys_slm.data.movielens`: GroupLens and RecBole importers, title normalisation, acquisition.
* :mod:`recsys_slm.data.tasks`: pointwise (TALLRec) and leave-one-out candidate tasks.

See ``docs/data.md`` for the column-by-column schema and the exact task rules.
"""

from recsys_slm.data.movielens import (
    fetch_movielens_100k,
    load_movielens_100k,
    normalize_title,
    read_grouplens_100k,
    read_recbole_atomic,
    split_title_year,
)
from recsys_slm.data.schema import (
    DataValidationError,
    InteractionLog,
    Problem,
    read_table,
    validate_log,
    validate_paths,
)
from recsys_slm.data.tasks import (
    CandidateTaskConfig,
    PointwiseTaskConfig,
    build_candidate_task,
    build_pointwise_task,
    sample_negatives,
    save_task,
)

__all__ = [
    "CandidateTaskConfig",
    "DataValidationError",
    "InteractionLog",
    "PointwiseTaskConfig",
    "Problem",
    "build_candidate_task",
    "build_pointwise_task",
    "fetch_movielens_100k",
    "load_movielens_100k",
    "normalize_title",
    "read_grouplens_100k",
    "read_recbole_atomic",
    "read_table",
    "sample_negatives",
    "save_task",
    "split_title_year",
    "validate_log",
    "validate_paths",
]
