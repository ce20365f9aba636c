"""Where a result came from (versions, commit, host, device, command line), and
deterministic mode."""
from __future__ import annotations

import os
import platform
import shlex
import socket
import sys
from pathlib import Path

import torch

# What cuBLAS needs for deterministic results on CUDA >= 10.2 (PyTorch's documentation
# of torch.use_deterministic_algorithms).
CUBLAS_WORKSPACE = ":4096:8"


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the checkout rode runs from (read from .git, no git needed);
    None when rode is not run from a checkout."""
    here = Path(start or Path(__file__).resolve().parent)
    for d in (here, *here.parents):
        git = d / ".git"
        if git.is_file():   # a worktree: "gitdir: <path>"
            text = git.read_text().strip()
            if text.startswith("gitdir:"):
                git = (d / text.split(":", 1)[1].strip()).resolve()
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head or None
            ref = head.split(":", 1)[1].strip()
            common = git
            if (git / "commondir").is_file():
                common = (git / (git / "commondir").read_text().strip()).resolve()
            for root in (git, common):
                if (root / ref).is_file():
                    return (root / ref).read_text().strip()
            packed = common / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
        except OSError:
            return None
        return None
    return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def provenance(device: torch.device) -> dict:
    """The summary's ``provenance`` block."""
    from . import __version__

    return {"rode_version": __version__, "git_commit": git_commit(),
            "torch": torch.__version__, "torchvision": _version("torchvision"),
            "hydra": _version("hydra-core"), "python": platform.python_version(),
            "host": socket.gethostname(), "device_name": device_name(device),
            "command": " ".join([sys.argv[0], *map(shlex.quote, sys.argv[1:])])}


def set_deterministic(on: bool) -> None:
    """``deterministic=true``: deterministic algorithms only (an op without one raises),
    cuDNN's deterministic kernels without autotuning, and cuBLAS's fixed workspace."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
