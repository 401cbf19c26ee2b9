"""Check that a requested torch device exists here, before any model or data is loaded."""

from __future__ import annotations

import os

import torch

from .errors import InputError


class DeviceError(InputError):
    """The requested device does not exist on this machine; the message names the fix."""


def check_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: CUDA when available, else the CPU), or :class:`DeviceError`
    naming what is missing and what to pass instead: CUDA asked of a torch built without it or of a machine
    without a visible GPU, ``cuda:N`` beyond the device count, MPS where it is not available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device {str(device)!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and not getattr(torch.version, "hip", None):
            raise DeviceError(
                f"device {str(device)!r}: this torch build ({torch.__version__}) has no CUDA support; use "
                "device 'cpu' (--device cpu), or install a CUDA build of torch"
            )
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            raise DeviceError(
                f"device {str(device)!r}: no CUDA GPU is visible to this process{hint}; use device 'cpu' "
                "(--device cpu), or run where a GPU and its driver are available"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
            raise DeviceError(
                f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s) ({have}); pass "
                "one of those"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(
                f"device {str(device)!r}: MPS is not available here (it needs Apple silicon, macOS 12.3+ and a "
                "torch build with MPS); use device 'cpu' (--device cpu)"
            )
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise DeviceError(f"device {str(device)!r}: no {dev.type} device is available here; use device 'cpu' "
                              "(--device cpu)")
    return dev
