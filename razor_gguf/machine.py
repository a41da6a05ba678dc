"""What a benchmark or evaluation ran on, recorded next to its numbers."""

from __future__ import annotations

import os
import platform
import subprocess


def machine_info() -> dict:
    """CPU, cores, memory, OS, Python, load, library build and GPU names, for a result's provenance."""
    from ._native import NativeLibraryError, build_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    m = {"cpu": cpu, "n_cores": os.cpu_count(), "mem_total_bytes": mem, "os": platform.platform(),
         "python": platform.python_version(), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        info = build_info()
        m.update(llama_cpp=f"{info.base_commit} + razor patch {info.patch_version}", backends=list(info.backends))
    except NativeLibraryError:
        pass
    if "cuda" in [b.lower() for b in m.get("backends", [])]:
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            m["gpu"] = r.stdout.strip().splitlines() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return m
