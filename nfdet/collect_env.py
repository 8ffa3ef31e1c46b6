"""Print the versions and hardware nfdet runs with: ``python -m nfdet.collect_env``."""

from __future__ import annotations

import importlib
import os
import platform
import sys

__all__ = ["collect_env_info"]


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is worth reporting as-is
        return f"not importable ({type(e).__name__}: {e})"
    return f"{getattr(mod, '__version__', 'unknown')} @ {os.path.dirname(mod.__file__ or '')}"


def _detectron2_ops() -> str:
    try:
        from detectron2 import _C  # noqa: F401
    except Exception:  # noqa: BLE001
        return (
            "no (pure Python build: ROIAlign/NMS from torchvision, COCO eval via pycocotools; "
            "deformable conv and rotated boxes unavailable)"
        )
    return "yes"


def collect_env_info() -> list[tuple[str, str]]:
    """Return ``(name, value)`` rows describing the environment."""
    import torch

    import nfdet

    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("nfdet", f"{nfdet.__version__} @ {os.path.dirname(nfdet.__file__)}"),
        ("torch", _version("torch")),
        ("torchvision", _version("torchvision")),
        ("detectron2", _version("detectron2")),
        ("detectron2 compiled ops (_C)", _detectron2_ops()),
        ("fvcore", _version("fvcore")),
        ("pycocotools", _version("pycocotools")),
        ("cv2", _version("cv2")),
        ("timm (tests only)", _version("timm")),
        ("CPU", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"),
        ("torch threads", str(torch.get_num_threads())),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"GPU {i}", torch.cuda.get_device_name(i)))
        rows.append(("CUDA (torch build)", str(torch.version.cuda)))
    return rows


def main() -> None:
    rows = collect_env_info()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
