"""Helpers shared by the bench/ scripts: peak memory, machine facts, tables and JSON results.

Not a public API: the scripts in bench/ import it by file location (`bench/` is the
script folder, so it is on `sys.path` when one of them runs). The packages come from the
project install (`pip install -e .`, done by the Makefile).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]

from toolkit.utils import write_json

RESULTS = ROOT / "bench" / "results"


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux `clear_refs` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS since start or the last `reset_peak_rss`, in bytes."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: the lifetime peak is the best we have
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def rss_bytes() -> int:
    """This process's current RSS in bytes (0 where /proc is unavailable)."""
    return (_status_kib("VmRSS") or 0) * 1024


def children_peak_rss_bytes() -> int:
    """The largest peak RSS among this process's finished children (DataLoader workers), in bytes."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def machine() -> dict:
    """Facts needed to read the numbers: CPU, cores, threads, versions and the load average."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from toolkit.hardware import cpu_kind

    kind = cpu_kind()  # the ISA flags and caps that decide which kernels ran (AVX2, AVX512-BF16, AMX)
    # Every table that prints info["cpu"] names the ISA with the model.
    info = {"cpu": f"{cpu} [{kind.isa}]", "isa": kind.isa, "native_bf16": kind.native("bf16"), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_avg_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def median(values: Iterable[float]) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Format `rows` as an aligned text table; `columns` are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(k) is None else format(row[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_results(name: str, payload: dict, out_dir: str | os.PathLike = RESULTS) -> Path:
    """Write `payload` (plus the end load average) as bench/results/NAME-TIMESTAMP.json; return the path."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out_dir) / f"{name}-{stamp}.json"
    payload = {**payload, "load_avg_end": os.getloadavg()}
    write_json(path, payload)
    return path


def small_run(model: str, root: Path, pairs: int, pca: int) -> Path:
    """A run folder of `model` (random init) trained on drawn pairs."""
    from synthetic.drawn_images import make_pairs

    make_pairs(root / "tll", n_pairs=pairs, seed=0)
    # The scripts run as their command lines (bench/extract.py would shadow an `import extract` here).
    script(["extract.py", "-d", root / "tll", "-s", root / "feats", "--data-aug", "-p", "adapt-pca", pca,
            "--model", model, "--pretrained", "none", "--workers", "0", "--no-progress"])
    feats = next((root / "feats").glob(f"*/features_pca{pca}.npy"))
    script(["train.py", "-d", feats, "--model", "original", "-s", root / "runs", "-e", "2", "-t", "15",
            "--test-split", "0.25", "-k", "1", "--seed", "0", "--no-images"])
    return root / "runs" / "run1"


def script(argv: list) -> None:
    subprocess.run([sys.executable, ROOT / argv[0], *map(str, argv[1:])], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def finish(name: str, args, machine_info: dict, prefix: str = "", **results) -> int:
    """The end of every bench script: `args`, `machine_info` and `results` saved by `save_results`,
    where they went printed (after `prefix`); returns the exit status 0."""
    path = save_results(name, {"args": vars(args), "machine": machine_info, **results})
    print(f"{prefix}wrote {path}")
    return 0
