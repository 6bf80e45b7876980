"""extract.py under torchrun, with rank $DIE_RANK killed (os._exit, no cleanup) right after it writes its first chunk.

Used by tests/test_extract_distributed.py to interrupt one rank of a real torchrun run. The chunk store's
public `ChunkStore.write` is wrapped (the extraction loop writes each batch's chunk through it), so no
private name of the pipeline is reached into.
"""

import os
import sys

import extract
from featuresExtractor.store import ChunkStore
from toolkit.cli import run_cli

write_chunk = ChunkStore.write


def dying_write(self, *args, **kwargs):
    path = write_chunk(self, *args, **kwargs)
    if os.environ.get("RANK") == os.environ["DIE_RANK"]:
        os._exit(9)
    return path


ChunkStore.write = dying_write
sys.exit(run_cli(extract.main, prog="extract.py"))
