"""The environment a run starts in: logged at start and kept in every checkpoint's metadata."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch

from ..checkpoint.manifest import versions


def git_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def collect(world_size: int) -> dict[str, str | int]:
    cuda = torch.cuda.is_available()
    return {
        **versions(),
        "torch": str(torch.__version__),  # with the build tag (e.g. +cu130) that package metadata leaves out
        "platform": platform.platform(),
        "executable": sys.executable,
        "git": git_hash(),
        "world_size": world_size,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "cuda": torch.version.cuda or "",
        "num_threads": torch.get_num_threads(),
    }


def format_env(env: dict) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in env.items())
