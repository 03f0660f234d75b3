"""The three-stage compression pipeline (``recsys-slm compress``): distill → prune → re-distill (with optional
regrowth), then evaluation, ablations and a report. See ``docs/compress.md``.

Modules: :mod:`.config` (``CompressConfig``), :mod:`.pipeline` (``compress``), :mod:`.regrow` (``regrow``),
:mod:`.report` (speed measurement, ``report.json`` / ``report.md`` / plot). Importing this package is cheap: the
heavy modules import torch and the stages only when used.
"""
