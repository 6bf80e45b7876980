"""Native bf16 detection (toolkit.hardware) and what the scripts say about --precision with it.

The detection is driven with given CPU flags and caps, so an AVX2 machine is played on any host.
"""

from __future__ import annotations

import json

import pytest

import extract
import toolkit.hardware as hardware
from conftest import make_pairs, planted_features, run_script
from toolkit.hardware import CpuKind, cpu_kind, resolve_precision

BF16_HOST = {"avx2", "avx512f", "avx512_bf16"}
AMX_HOST = {"avx2", "avx512f", "amx_tile", "amx_bf16"}
AVX2_HOST = {"avx2"}


@pytest.mark.parametrize("flags,capability,cap,native", [
    (BF16_HOST, "AVX512", None, True),
    (AMX_HOST, "AVX512", None, True),
    (AVX2_HOST, "AVX2", None, False),                      # a laptop: no AVX512 at all
    ({"avx2", "avx512f"}, "AVX512", None, False),          # AVX512 without its bf16 instructions
    (BF16_HOST, "AVX2", None, False),                      # ATEN_CPU_CAPABILITY=avx2
    (BF16_HOST, "AVX512", "AVX2", False),                  # ONEDNN_MAX_CPU_ISA=AVX2
    (BF16_HOST, "AVX512", "avx512_core", False),           # below AVX512_CORE_BF16, any case
    (BF16_HOST, "AVX512", "AVX512_CORE_BF16", True),
    (AMX_HOST, "AVX512", "AVX512_CORE_AMX", True),
    (BF16_HOST, "AVX512", "ALL", True),
    (BF16_HOST, "AVX512", "NOT_AN_ISA", False),            # a cap this code cannot place: not trusted
])
def test_native_bf16_follows_flags_and_caps(flags, capability, cap, native):
    kind = CpuKind.from_values(flags, capability=capability, onednn_cap=cap)
    assert kind.native("bf16") is native
    assert kind.native("fp32")
    if not native:
        assert kind.why_not("bf16")


def test_cpu_kind_reads_cpuinfo_and_the_environment():
    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16 sse2\n"
    kind = cpu_kind(env={}, cpuinfo=cpuinfo)
    assert kind.model == "Some CPU" and {"avx2", "avx512_bf16"} <= kind.flags and kind.onednn_cap is None
    capped = cpu_kind(env={"ONEDNN_MAX_CPU_ISA": "AVX2"}, cpuinfo=cpuinfo)
    assert capped.onednn_cap == "AVX2" and not capped.native("bf16")
    assert cpu_kind(env={"DNNL_MAX_CPU_ISA": "avx2"}, cpuinfo=cpuinfo).onednn_cap == "AVX2"
    assert not cpu_kind(env={}, cpuinfo="flags : avx2\n").native("bf16")
    assert "avx512_bf16" in kind.isa and "oneDNN<= AVX2" in capped.isa


def test_resolve_precision_on_the_cpu():
    avx2 = CpuKind.from_values(AVX2_HOST, capability="AVX2")
    bf16 = CpuKind.from_values(BF16_HOST, capability="AVX512")
    auto = resolve_precision("auto", "cpu", avx2)
    assert auto.precision == "fp32" and "auto -> fp32" in auto.note and "no AVX512-BF16" in auto.note
    assert auto.warning is None
    assert resolve_precision("auto", "cpu", bf16).precision == "bf16"
    explicit = resolve_precision("bf16", "cpu", avx2)
    assert explicit.precision == "bf16" and explicit.note is None
    assert explicit.warning.startswith("warning: bf16 is emulated on this CPU")
    assert resolve_precision("bf16", "cpu", bf16).warning is None
    assert resolve_precision("fp16", "cpu", bf16).warning.startswith("warning: fp16 is emulated")
    assert resolve_precision("fp32", "cpu", avx2) == hardware.Precision("fp32")


@pytest.fixture
def avx2_machine(monkeypatch):
    """This host played as an AVX2-only CPU, for the scripts' lines."""
    monkeypatch.setattr(hardware, "cpu_kind", lambda env=None, cpuinfo=None: CpuKind.from_values(AVX2_HOST, "AVX2"))


def _extract_argv(tmp_path, *extra):
    data = tmp_path / "tll"
    if not data.exists():
        make_pairs(data, 3, seed=1)
    return ["-d", data, "-s", tmp_path / "out", "-p", "adapt", "--model", "tiny_rn", "--pretrained", "none",
            "--workers", "0", "--no-progress", "--overwrite", *extra]


def test_extract_auto_says_what_it_chose(tmp_path, capsys, avx2_machine):
    code, _, err = run_script(extract, _extract_argv(tmp_path, "--precision", "auto"), capsys)
    assert code == 0, err
    lines = [l for l in err.splitlines() if "precision auto" in l]
    assert lines == ["extract.py: precision auto -> fp32: this CPU has no AVX512-BF16 or AMX, so bf16 would be emulated"]
    manifest = json.loads((tmp_path / "out" / "tiny_rn" / "manifest.json").read_text())
    assert manifest["precision"] == "fp32"


def test_extract_explicit_bf16_on_avx2_warns_once_and_goes_on(tmp_path, capsys, avx2_machine):
    code, _, err = run_script(extract, _extract_argv(tmp_path, "--precision", "bf16"), capsys)
    assert code == 0, err
    warnings = [l for l in err.splitlines() if "emulated" in l]
    assert len(warnings) == 1 and warnings[0].startswith("extract.py: warning: bf16 is emulated on this CPU")
    manifest = json.loads((tmp_path / "out" / "tiny_rn" / "manifest.json").read_text())
    assert manifest["precision"] == "bf16"


def test_extract_auto_on_a_missing_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_script(extract, _extract_argv(tmp_path, "--precision", "auto", "--device", "cuda"), capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == ["extract.py: error: --device cuda was asked for but CUDA is not available; "
                                        "use --device cpu"]


def test_train_auto_and_emulated_bf16_lines(tmp_path, capsys, avx2_machine):
    import train

    features = planted_features(tmp_path / "f" / "features.npy", 40)
    base = ["-d", features, "-e", "1", "--seed", "0", "--no-images", "--cpu"]
    code, _, err = run_script(train, [*base, "-s", tmp_path / "a", "--precision", "auto"], capsys)
    assert code == 0, err
    assert "train.py: precision auto -> fp32: this CPU has no AVX512-BF16 or AMX" in err
    assert json.loads((tmp_path / "a" / "run1" / "config.json").read_text())["precision"] == "fp32"
    code, _, err = run_script(train, [*base, "-s", tmp_path / "b", "--precision", "bf16"], capsys)
    assert code == 0, err
    assert sum("warning: bf16 is emulated" in l for l in err.splitlines()) == 1
