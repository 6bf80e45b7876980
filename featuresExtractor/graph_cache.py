"""The cache of built engine graphs: one ONNX graph per model, in the user's cache folder, never beside the data.

An entry is two files in `cache_folder()` (`$XDG_CACHE_HOME/adaptation-similarity/graphs`, by default
`~/.cache/adaptation-similarity/graphs`):

- `KEY.onnx`: the graph;
- `KEY.json`: its sidecar: the format tag, everything that defines the graph (`key`: the weights'
  sha256, taps, transform, input shape, library versions, ...), the graph's size and sha256, and
  what building it cost (`build_s`).

KEY is the sha256 of the key's canonical JSON, so anything that changes the graph names another
entry. This module alone writes and reads entries (`GraphCache.get`):

- an entry is used only when its sidecar parses, describes this key, and the graph's size and sha256
  match it; otherwise it is damaged: said in one line, and built again;
- it is built under `toolkit.lock.sibling_lock`, so two processes filling one entry at once make one
  build: the second waits for the first (up to `wait_s`) and then uses its entry; if the first is still
  building after that, `get` returns None (the caller runs without the graph);
- the graph and then its sidecar are put in place by atomic renames (`toolkit.utils.atomic_path`),
  the sidecar last: a killed build leaves no entry that looks whole;
- a folder that cannot be written (read-only, full, not a folder) is said in one line and the graph is
  built for this process only, in memory (`get` returns bytes instead of a path).

Example:
    >>> cache = GraphCache(cache_folder())                                     # doctest: +SKIP
    >>> source = cache.get({"weights": "...", "taps": [...]}, build=write_graph_to)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from toolkit.hashing import file_sha256
from toolkit.lock import LockBusy, LockUnwritable, sibling_lock
from toolkit.utils import atomic_path, first_line, os_error_line, write_json

__all__ = ["FORMAT", "GraphCache", "cache_folder", "key_digest"]

FORMAT = "adaptation-similarity graph cache entry, version 1"
"""The sidecar's `format` tag."""

APP = "adaptation-similarity"


def cache_folder(env: dict | None = None) -> Path:
    """Where graphs are cached: `$XDG_CACHE_HOME/adaptation-similarity/graphs` (an absolute XDG_CACHE_HOME
    only, as the XDG spec says), else `~/.cache/adaptation-similarity/graphs`."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / APP / "graphs"


def key_digest(key: dict) -> str:
    """The entry name of `key`: the sha256 of its canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _say(line: str) -> None:
    print(line, file=sys.stderr)


class GraphCache:
    """The entries of one cache folder.

    Args:
        folder: the cache folder (`cache_folder()`).
        say: where the one-line notes go (damaged entry, unwritable folder, build cost); stderr by default.
        wait_s: how long a process waits for another that is building the same entry.
    """

    def __init__(self, folder: str | os.PathLike, say: Callable[[str], None] = _say, wait_s: float = 600.0):
        self.folder, self.say, self.wait_s = Path(folder), say, wait_s

    def paths(self, key: dict) -> tuple[Path, Path]:
        """(graph, sidecar) of `key`'s entry."""
        name = key_digest(key)
        return self.folder / f"{name}.onnx", self.folder / f"{name}.json"

    def check(self, key: dict) -> str | None:
        """Why `key`'s entry cannot be used ("missing", or what is damaged), None when it can."""
        graph, sidecar = self.paths(key)
        if not sidecar.exists() and not graph.exists():
            return "missing"
        for path in (sidecar, graph):  # a FIFO or a device would block the reads below
            if not path.is_file():
                return f"{path.name} is not a regular file"
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as err:
            return f"its sidecar {sidecar.name} cannot be read ({first_line(err)})"
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
            return f"its sidecar {sidecar.name} describes another graph"
        try:
            size = graph.stat().st_size
            if size != meta.get("size") or file_sha256(graph) != meta.get("sha256"):
                return f"{graph.name} does not match its sidecar's size and sha256"
        except OSError as err:
            return f"{graph.name} cannot be read ({first_line(err)})"
        return None

    def get(self, key: dict, build: Callable[[Path], None]) -> str | bytes | None:
        """The graph of `key`: a checked entry's path, or bytes when the folder cannot be written, or None.

        `build(path)` writes the graph to `path`; it is called only when no usable entry exists, by
        one process at a time. None: another process was still building it after `wait_s` seconds, or
        no folder could hold the graph (each said in one line). A `UserError` from `build` (a graph
        that cannot be exported) is raised.
        """
        graph, _ = self.paths(key)
        why = self.check(key)
        if why is None:
            return str(graph)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with sibling_lock(graph, "the graph cache entry", wait_s=self.wait_s):
                why = self.check(key)  # another process may have built it while this one waited
                if why is None:
                    return str(graph)
                if why != "missing":
                    self.say(f"engine cache: the entry {graph} is damaged ({why}); building it again")
                return self._build_entry(key, build)
        except LockBusy:
            self.say(f"engine cache: another process is still building {graph} after {self.wait_s:.0f} s; "
                     f"this run goes on without it")
            return None
        except (OSError, LockUnwritable) as err:
            reason = os_error_line(err) if isinstance(err, OSError) else str(err)
            self.say(f"engine cache: cannot write the cache folder {self.folder} ({reason}); the graph is built "
                     f"for this run only (set XDG_CACHE_HOME to a writable folder to keep it)")
            return self._build_in_memory(build)

    def _build_entry(self, key: dict, build: Callable[[Path], None]) -> str:
        graph, sidecar = self.paths(key)
        start = time.perf_counter()
        with atomic_path(graph) as tmp:
            build(tmp)
            digest, size = file_sha256(tmp), tmp.stat().st_size
        build_s = time.perf_counter() - start
        meta: dict[str, Any] = {"format": FORMAT, "key": key, "size": size, "sha256": digest,
                                "build_s": round(build_s, 2), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            write_json(sidecar, meta)
        except OSError:
            graph.unlink(missing_ok=True)  # no sidecar: the graph alone is not an entry
            raise
        self.say(f"engine cache: built the graph in {build_s:.1f} s, kept as {graph} ({size / 2**20:.0f} MiB); "
                 f"later runs of this model start from it")
        return str(graph)

    def _build_in_memory(self, build: Callable[[Path], None]) -> bytes | None:
        """The graph built in the system's temporary folder and read back (the file removed at once); None
        when that folder cannot be written either."""
        try:
            with tempfile.TemporaryDirectory(prefix="graph-") as tmp:
                path = Path(tmp) / "graph.onnx"
                build(path)
                return path.read_bytes()
        except OSError as err:
            self.say(f"engine cache: cannot build the graph in the temporary folder either ({os_error_line(err)}); "
                     f"this run goes on without it")
            return None
