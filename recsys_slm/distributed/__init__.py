"""Ray backends of the distillation pipeline (``backend=ray``; see ``docs/ray.md``).

* :mod:`~recsys_slm.distributed.ingest`: Ray Data ingestion of interaction logs (many parquet files or URIs) →
  rows validated by the foundation schema → pointwise (user, history, item) records.
* :mod:`~recsys_slm.distributed.score`: ``recsys-slm teacher score --backend ray``, an actor pool writing the
  teacher cache, resumable by output shard.
* :mod:`~recsys_slm.distributed.train`: ``recsys-slm distill ... backend=ray``, the single-process training
  function run data-parallel by Ray Train with checkpoints and worker-failure recovery.
* :mod:`~recsys_slm.distributed.session`: join ``$RAY_ADDRESS`` or start a local Ray inside the run directory;
  resource checks that turn Ray's silent waits into errors.
* :mod:`~recsys_slm.distributed.config`: the ``backend`` / ``ray.*`` keys.

Importing this package imports neither Ray nor torch; the submodules import Ray when called.
"""
