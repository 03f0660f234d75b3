"""Importing recsys_slm must not import Ray or FAISS, nor initialise CUDA (fast CLI start, no side effects)."""

import subprocess
import sys


def test_import_is_lean():
    code = (
        "import sys, recsys_slm, recsys_slm.cli, recsys_slm.config, recsys_slm.data.prompts\n"
        "bad = [m for m in ('ray', 'faiss') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
