"""recsys_slm: compress LLM rankers and embedding retrievers for recommender systems.

The library holds building blocks (data layer, configs, model loading, stages). Runnable jobs live in
``pipelines/``, the evaluation entry points in ``eval/`` and the online service in ``serving/``; those folders
import this package, never the reverse. Importing ``recsys_slm`` touches neither Ray, FAISS nor CUDA.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
