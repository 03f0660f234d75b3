"""Online ranking service on Ray Serve (``recsys-slm serve``): see docs/serving.md.

Modules: ``config`` (ServingConfig), ``schemas`` (pydantic bodies), ``engine`` (variants, shared-prefix batch
scoring, profiling, SLO choice), ``admission`` (bounded queue, degrade, shed), ``metrics`` (Prometheus),
``service`` (FastAPI app, Ray-free), ``deployment`` (Ray Serve deployment and the start/stop loop), ``cli``.
Importing this package imports neither Ray nor torch.
"""
