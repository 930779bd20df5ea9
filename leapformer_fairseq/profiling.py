"""Peak resident memory of CPU work, for the memory test and ``benchmarks/`` (Linux only).

glibc keeps freed heap memory for reuse, which would hide later peaks; we make every allocation
of 64 KiB or more its own mapping (returned to the system on free) and reset the kernel's
high-water mark (``/proc/self/clear_refs``) before measuring.
"""
import ctypes
import gc
from typing import Any, Callable, Tuple

_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 64 * 1024
_libc = None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _release_freed_memory() -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6")
        if _libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) != 1:
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: cannot measure peak memory")
    gc.collect()
    _libc.malloc_trim(0)


def peak_rss_increase(work: Callable[[], Any]) -> Tuple[int, Any]:
    """Run ``work()`` and return (bytes its peak RSS rose above the RSS before it, its result)."""
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as error:
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)") from error
    before = _status_kib("VmRSS")
    result = work()
    return (_status_kib("VmHWM") - before) * 1024, result
