"""Runnable jobs: thin, readable recipes over the ``recsys_slm`` library, each with YAML configs in configs/.

Run from the repository root: ``python -m pipelines.<name> --config pipelines/configs/<name>/<file>.yaml``.
This folder is not installed into site-packages; ``recsys_slm`` never imports it.
"""
