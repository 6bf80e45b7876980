"""extract.py's fp32 output on fixed drawn images is pinned: within a tolerance everywhere, byte for byte per kernel family.

fp32 kernels differ in their last bits across ISAs (AVX512 and AVX2 builds of oneDNN's convolutions and
ATen's reductions), so exact bytes can only hold among machines whose torch runs the same kernels:
`toolkit.hardware.CpuKind.kernels` names them, and `PINNED` holds the bytes of each family measured.
Everywhere, the vectors must equal the committed reference (`tests/data/pinned_tiny_rn.npz`) within
`TOLERANCE`, which any change to what extract.py computes or writes (values, dtype, field layout) breaks.

History: the checksums were recorded before the modules were restructured. `features_pca8.npy` was
re-pinned when the PCA became streamed (float64 covariance + eigh instead of sklearn's solvers on all
rows at once; equal to them within 1e-6, see tests/test_scale.py), and again with the pins per kernel
family (issue 29): since the PCA's Gram-matrix path for n < d its bytes were ca46437d... on the
AVX512-BF16 host, where the old pin no longer held; `features.npy` kept its checksum throughout.
The "aten=AVX2,onednn=AVX2" pins were taken on the AVX512-BF16 host capped with
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` (the same kernels an AVX2-only CPU runs).
"""

from __future__ import annotations

import hashlib

import numpy as np

import extract
from conftest import ROOT, make_pairs
from toolkit.cli import run_cli
from toolkit.hardware import cpu_kind

_BYTES = {
    "features.npy": "04705a9b6b90be9b72fd6399c19bf1c99fb53dde8a86103ed6335397cfec9f22",
    "features_pca8.npy": "ca46437db568897496760f5a6f72534b75878ca95186f1351a44de9dcb66871d",
}
PINNED = {"aten=AVX512,onednn=AVX512": _BYTES, "aten=AVX2,onednn=AVX2": _BYTES}
"""Exact sha256 of each output per kernel family (`CpuKind.kernels`) where it was measured."""
REFERENCE = ROOT / "tests" / "data" / "pinned_tiny_rn.npz"
TOLERANCE = 1e-5
"""Largest absolute difference from the reference vectors (their entries are below 1 in magnitude)."""


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(arr.tobytes() + repr(arr.dtype.descr).encode()).hexdigest()


def _extract(tmp_path, capsys) -> dict[str, np.ndarray]:
    data = tmp_path / "tll"
    make_pairs(data, 5, seed=7)
    out = tmp_path / "out"
    argv = ["-d", str(data), "-s", str(out), "-b", "4", "--data-aug", "--processor", "adapt-pca", "8",
            "--model", "tiny_rn", "--pretrained", "none", "--workers", "0", "--no-progress", "--engine", "torch"]
    code = run_cli(extract.main, argv)
    assert code == 0, capsys.readouterr().err
    return {name: np.load(out / "tiny_rn" / name) for name in _BYTES}


def test_fp32_extraction_is_byte_identical(tmp_path, capsys):
    got = _extract(tmp_path, capsys)
    reference = np.load(REFERENCE, allow_pickle=False)
    for name, arr in got.items():
        ref = reference[name]
        assert arr.dtype == ref.dtype and arr.shape == ref.shape, name
        assert (arr["name"] == ref["name"]).all() and (arr["augmented"] == ref["augmented"]).all(), name
        for side in ("left", "right"):
            assert np.abs(arr[side] - ref[side]).max() <= TOLERANCE, (name, side)
    pins = PINNED.get(cpu_kind().kernels)
    if pins is not None:  # a kernel family without pins is checked within the tolerance only
        assert {name: _digest(arr) for name, arr in got.items()} == pins


def test_the_pins_cover_both_kinds_of_cpu():
    assert set(PINNED) == {"aten=AVX512,onednn=AVX512", "aten=AVX2,onednn=AVX2"}
    reference = np.load(REFERENCE, allow_pickle=False)
    assert {name: _digest(reference[name]) for name in _BYTES} == _BYTES  # the reference is the AVX512 output
