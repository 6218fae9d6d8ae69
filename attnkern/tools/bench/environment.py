"""Where a benchmark ran: device, versions, git commit, host and date, for the results file."""
from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from typing import Dict, Optional

import torch

from ... import __version__


def _git(*args: str) -> Optional[str]:
    """Run git in the directory attnkern was imported from (a source checkout), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> Dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    return {"type": device.type, "name": _cpu_name(), "threads": torch.get_num_threads(),
            "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()}


def versions() -> Dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed, or broken: either way not usable
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"attnkern": __version__, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "cudnn": cudnn, "python": platform.python_version()}


def environment(device: torch.device) -> Dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device_info(device),
        "versions": versions(),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }


def device_tag(device: torch.device) -> str:
    """A short file-name-safe name for the device, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu'."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")
