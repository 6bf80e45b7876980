"""extract.py's fp32 output on fixed drawn images is pinned byte for byte.

The checksums were recorded before the modules were restructured; any change to
what extract.py computes or writes (values, dtype, field layout) changes them.
`features_pca8.npy` was re-pinned when the PCA became streamed (float64 covariance + eigh instead
of sklearn's solvers on all rows at once; equal to them within 1e-6, see tests/test_scale.py);
`features.npy` kept its checksum.
"""

from __future__ import annotations

import hashlib

import numpy as np

import extract
from conftest import make_pairs
from toolkit.cli import run_cli

PINNED = {
    "features.npy": "04705a9b6b90be9b72fd6399c19bf1c99fb53dde8a86103ed6335397cfec9f22",
    "features_pca8.npy": "f2025dc97fe2e63c3bb81007ce9292592acc4165416d09b68f1971492df0797c",
}


def test_fp32_extraction_is_byte_identical(tmp_path, capsys):
    data = tmp_path / "tll"
    make_pairs(data, 5, seed=7)
    out = tmp_path / "out"
    argv = ["-d", str(data), "-s", str(out), "-b", "4", "--data-aug", "--processor", "adapt-pca", "8",
            "--model", "tiny_rn", "--pretrained", "none", "--workers", "0", "--no-progress"]
    code = run_cli(extract.main, argv)
    assert code == 0, capsys.readouterr().err
    got = {}
    for name in PINNED:
        arr = np.load(out / "tiny_rn" / name)
        got[name] = hashlib.sha256(arr.tobytes() + repr(arr.dtype.descr).encode()).hexdigest()
    assert got == PINNED
