"""What this machine runs natively: the one place that decides whether bf16 (or fp16) is native here.

bf16 is fast on a CPU only where it has bf16 instructions (AVX512-BF16, or AMX's tiles) *and* the
libraries are allowed to use them: `ONEDNN_MAX_CPU_ISA` (oneDNN's convolutions and matmuls) and
`ATEN_CPU_CAPABILITY` (ATen's vectorised kernels) cap what torch uses below what the CPU has.
Elsewhere torch emulates bf16 through fp32, several times slower than fp32 itself.

`cpu_kind()` reads the CPU's flags (/proc/cpuinfo), those caps and
`torch.backends.cpu.get_cpu_capability()` into a `CpuKind`; `CpuKind.from_values` builds one from
given values, so tests can play an AVX2 machine on any host. `resolve_precision` turns
`--precision auto|fp32|bf16|fp16` and a device into what runs, with the line to print.

Example:
    >>> kind = CpuKind.from_values({"avx2", "avx512f", "avx512_bf16"}, capability="AVX512")
    >>> kind.native("bf16")
    True
    >>> CpuKind.from_values({"avx2", "avx512f", "avx512_bf16"}, capability="AVX2").native("bf16")
    False
    >>> resolve_precision("auto", "cpu", CpuKind.from_values({"avx2"}, capability="AVX2")).precision
    'fp32'
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

__all__ = ["CpuKind", "cpu_kind", "Precision", "resolve_precision", "PRECISION_CHOICES"]

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
"""What `--precision` accepts; `auto` is resolved by `resolve_precision`."""

# oneDNN's ISA names in increasing order (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA); bf16 compute needs
# AVX512_CORE_BF16 or above, fp16 compute AVX512_CORE_FP16 or above (AMX levels included).
_ONEDNN_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                 "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX",
                 "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16")
_RELEVANT = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "avx_vnni"})
_NEEDS = {"bf16": ({"avx512_bf16", "amx_bf16"}, "AVX512_CORE_BF16", "AVX512-BF16 or AMX"),
          "fp16": ({"avx512_fp16", "amx_fp16"}, "AVX512_CORE_FP16", "AVX512-FP16 or AMX-FP16")}


@dataclass(frozen=True)
class CpuKind:
    """The CPU's ISA flags and the caps the libraries run under.

    Attributes:
        model: the CPU's model name ("" when unknown).
        flags: the /proc/cpuinfo flags that matter here (avx2, avx512f, avx512_bf16, amx_bf16, amx_tile, ...).
        onednn_cap: `ONEDNN_MAX_CPU_ISA` (or `DNNL_MAX_CPU_ISA`) upper-cased, None when unset.
        capability: `torch.backends.cpu.get_cpu_capability()` (ATen's kernels: "AVX512", "AVX2", "DEFAULT", ...).
    """

    model: str = ""
    flags: frozenset = field(default_factory=frozenset)
    onednn_cap: str | None = None
    capability: str = "DEFAULT"

    @classmethod
    def from_values(cls, flags, capability: str = "AVX512", onednn_cap: str | None = None, model: str = "") -> "CpuKind":
        """A `CpuKind` from given values (tests, or another machine's description)."""
        return cls(model, frozenset(flags), onednn_cap.upper() if onednn_cap else None, capability.upper())

    def _capped_below(self, level: str) -> bool:
        cap = self.onednn_cap
        if cap is None or cap in ("ALL", "DEFAULT"):
            return False
        if cap not in _ONEDNN_ORDER:  # a name this list does not know: assume it allows nothing special
            return True
        return _ONEDNN_ORDER.index(cap) < _ONEDNN_ORDER.index(level)

    def native(self, precision: str) -> bool:
        """Whether `precision` runs natively on this CPU (fp32 always does)."""
        if precision == "fp32":
            return True
        flags, level, _ = _NEEDS[precision]
        return bool(self.flags & flags) and not self._capped_below(level) and self.capability.startswith("AVX512")

    def why_not(self, precision: str) -> str:
        """Why `precision` is not native here, in a few words (for the one line a script prints)."""
        flags, level, names = _NEEDS[precision]
        if not self.flags & flags:
            return f"this CPU has no {names}"
        if self._capped_below(level):
            return f"ONEDNN_MAX_CPU_ISA={self.onednn_cap} keeps oneDNN below {level}"
        return f"torch's CPU kernels run at {self.capability} (ATEN_CPU_CAPABILITY?), not AVX512"

    @property
    def kernels(self) -> str:
        """Which kernels torch's fp32 arithmetic runs here, e.g. "aten=AVX512,onednn=AVX512" or "aten=AVX2,onednn=AVX2".

        fp32 results differ in their last bits between kernel families (not between CPUs of one family),
        so exact bytes are pinned per value of this (tests/test_pinned.py).
        """
        if "avx512f" in self.flags and not self._capped_below("AVX512_CORE"):
            onednn = "AVX512"
        elif "avx2" in self.flags and not self._capped_below("AVX2"):
            onednn = "AVX2"
        else:
            onednn = "older"
        return f"aten={self.capability},onednn={onednn}"

    @property
    def isa(self) -> str:
        """The ISA flags that matter for speed, as one short string for benchmark tables."""
        shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16") if f in self.flags]
        caps = [f"oneDNN<= {self.onednn_cap}"] if self.onednn_cap else []
        return " ".join([*shown, f"aten={self.capability}", *caps])

    def as_dict(self) -> dict:
        return {"cpu": self.model, "isa": self.isa, "native_bf16": self.native("bf16")}


def _cpuinfo(text: str) -> tuple[str, frozenset]:
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_kind(env: Mapping[str, str] | None = None, cpuinfo: str | None = None) -> CpuKind:
    """This machine's `CpuKind`: /proc/cpuinfo's flags, the ISA caps in `env` (default: the process's)
    and torch's CPU capability."""
    import torch

    env = os.environ if env is None else env
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = _cpuinfo(cpuinfo)
    flags = flags & _RELEVANT
    cap = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    return CpuKind.from_values(flags, torch.backends.cpu.get_cpu_capability(), cap, model)


@dataclass(frozen=True)
class Precision:
    """What `resolve_precision` decided.

    Attributes:
        precision: fp32, bf16 or fp16: what runs.
        note: the header line saying what `auto` chose and why (None when not auto).
        warning: one line when an explicit precision is emulated on this CPU (None otherwise).
    """

    precision: str
    note: str | None = None
    warning: str | None = None


def resolve_precision(requested: str, device, kind: CpuKind | None = None) -> Precision:
    """`--precision` on `device` (a torch.device or its name) -> what runs, with what to say.

    `auto`: bf16 on CUDA devices that support it and on CPUs with native bf16 (`CpuKind.native`),
    fp32 otherwise. An explicit bf16 or fp16 on a CPU without native support is kept, with a
    warning line (the user asked for it). `kind` defaults to `cpu_kind()`.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if requested != "auto":
            return Precision(requested)
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "precision auto -> bf16: this CUDA device supports bf16")
        return Precision("fp32", "precision auto -> fp32: this CUDA device has no bf16")
    kind = cpu_kind() if kind is None else kind
    if requested == "auto":
        if kind.native("bf16"):
            return Precision("bf16", "precision auto -> bf16: this CPU runs bf16 natively (AVX512-BF16/AMX)")
        return Precision("fp32", f"precision auto -> fp32: {kind.why_not('bf16')}, so bf16 would be emulated")
    if requested != "fp32" and not kind.native(requested):
        return Precision(requested, warning=f"warning: {requested} is emulated on this CPU ({kind.why_not(requested)}): "
                                            f"several times slower than fp32")
    return Precision(requested)
