"""extract.py under torchrun, with rank $DIE_RANK killed (os._exit, no cleanup) right after it writes its first chunk.

Used by tests/test_distributed.py to interrupt one rank of a real torchrun run.
"""

import os
import sys

import extract
import featuresExtractor.pipeline as pipeline
from toolkit.cli import run_cli

_store_batch = pipeline._store_batch


def _dying_store_batch(*args, **kwargs):
    path = _store_batch(*args, **kwargs)
    if os.environ.get("RANK") == os.environ["DIE_RANK"]:
        os._exit(9)
    return path


pipeline._store_batch = _dying_store_batch
sys.exit(run_cli(extract.main, prog="extract.py"))
