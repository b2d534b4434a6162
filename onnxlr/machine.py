"""The machine a measurement was made on, and the memory it took: what a benchmark prints
beside its timings so that a reader can tell whether two figures are comparable."""
from __future__ import annotations

import gc
import os
import platform
import shutil
import subprocess
import sys

__all__ = ["PeakRSS", "machine_description"]


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if (key.strip() in ("model name", "Processor", "cpu model", "Hardware")
                        and value.strip()):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu_name() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return ", ".join(dict.fromkeys(names)) or None


def machine_description(provider: str = "cpu") -> str:
    """Platform, CPU model and core count, GPU name (GPU providers), onnxruntime version."""
    import onnxruntime
    parts = [platform.platform()]
    cpu = _cpu_model()
    parts.append(f"{cpu + ', ' if cpu else ''}{os.cpu_count() or '?'} logical CPUs")
    if provider.lower() != "cpu":
        gpu = _gpu_name()
        if gpu:
            parts.append(f"GPU {gpu}")
    parts.append(f"onnxruntime {onnxruntime.__version__}, python {platform.python_version()}")
    return "; ".join(parts)


class PeakRSS:
    """Growth of the process's peak resident set size over a stretch of work.

    Methods, best first:

    1. Linux: write ``5`` to ``/proc/self/clear_refs``, which resets the peak
       (``VmHWM`` in ``/proc/self/status``) to the current RSS; afterwards
       ``VmHWM - RSS before`` is the peak growth of that stretch alone.
    2. Elsewhere on Unix: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the
       lifetime peak, which cannot be reset: the growth only shows once the
       process exceeds its earlier peak, so it is a *lower bound* (a model
       that needs less than the earlier peak reads 0).
    3. Windows with psutil: ``peak_wset``, same lower-bound caveat.

    Limits common to all: this is the whole process, so other threads'
    allocations count too; memory that the allocator already holds (freed by
    earlier work but not returned to the OS) is reused without raising RSS,
    so later models can read low, even 0; the first model also pays ORT's
    one-time set-up; memory-mapped weights count only once touched; GPU
    memory is not included. Treat it as a rough figure, good for spotting a
    model that needs far more host memory than another, not for ranking
    models of similar size.
    """

    def __init__(self) -> None:
        self.method: str | None = None
        if self._clear_refs() and self._status("VmHWM") is not None:
            self.method = ("VmHWM growth, peak reset per model via /proc/self/clear_refs "
                           "(session creation + first run; host memory only)")
            self._kind = "clear_refs"
        elif self._rusage() is not None:
            self.method = ("getrusage ru_maxrss growth (session creation + first run; lifetime "
                           "peak, so a lower bound once an earlier model peaked higher; "
                           "host memory only)")
            self._kind = "rusage"
        elif self._psutil_peak() is not None:
            self.method = ("psutil peak working set growth (session creation + first run; "
                           "lifetime peak, so a lower bound; host memory only)")
            self._kind = "psutil"
        else:
            self._kind = None
        self._start: float | None = None

    @staticmethod
    def _clear_refs() -> bool:
        if not sys.platform.startswith("linux"):
            return False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> float | None:
        """A ``/proc/self/status`` entry in MiB."""
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
        return None

    @staticmethod
    def _rusage() -> float | None:
        try:
            import resource
        except ImportError:
            return None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB

    @staticmethod
    def _psutil_peak() -> float | None:
        try:
            import psutil
            info = psutil.Process().memory_info()
        except Exception:  # not installed, or no access
            return None
        peak = getattr(info, "peak_wset", None)
        return None if peak is None else peak / (1 << 20)

    def start(self) -> None:
        gc.collect()
        if self._kind == "clear_refs":
            self._clear_refs()
            self._start = self._status("VmRSS")
        elif self._kind == "rusage":
            self._start = self._rusage()
        elif self._kind == "psutil":
            self._start = self._psutil_peak()

    def stop(self) -> float | None:
        """Peak growth in MiB since :meth:`start` (never negative), or None."""
        if self._start is None:
            return None
        if self._kind == "clear_refs":
            end = self._status("VmHWM")
        elif self._kind == "rusage":
            end = self._rusage()
        else:
            end = self._psutil_peak()
        start, self._start = self._start, None
        return None if end is None else max(0.0, end - start)


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``); False elsewhere.

    Why: factors of a few MB each come from the heap, not from their own mappings, and
    glibc returns freed heap memory only from its top: after the factor cache of a 1.2B
    model is dropped, ~0.5 GB stayed resident while ONNX Runtime loaded the weights.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
