"""Reading PyTorch files safely: tensors only (``weights_only``), and a clear error for anything else."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file that is no such checkpoint (text, a pickle of
    objects) raises ValueError in one line rather than torch's KeyError or its advice to unpickle code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):  # said as what it is
        raise
    except Exception as exc:  # noqa: BLE001 - KeyError, UnpicklingError, RuntimeError, EOFError, a truncated
        # file's OSError (EINVAL)... by file
        raise ValueError(f"{path}: not a PyTorch checkpoint of tensors, or cut short ({type(exc).__name__})") from exc
