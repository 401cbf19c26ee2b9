"""Why ``torch.load(weights_only=True)`` refused a ``.pt`` file: damaged, or a valid pickle of more than tensors.

torch's refusal reads the same for both ("Weights only load failed ..."). Telling them apart matters: a
renamed pickle is not "truncated or corrupted", and the user needs to hear that it was refused on purpose,
since unpickling arbitrary objects can run code. The pickle's opcodes are read without executing them.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from pathlib import Path

_PLAIN_GLOBALS = ("collections.OrderedDict", "_codecs.encode")


def weights_only_refusal(path: str | os.PathLike, err: BaseException) -> str | None:
    """Why ``torch.load(path, weights_only=True)`` refused a file that *is* a valid pickle, or None when the
    file is damaged (not a pickle at all). Reads the pickle's opcodes without executing any of them."""
    if not isinstance(err, pickle.UnpicklingError) or "Weights only load failed" not in str(err):
        return None
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                data, kind = z.read(name), "torch.save file"
        else:
            data, kind = path.read_bytes(), "pickle"
        names, strings, protocol = [], [], None
        for op, arg, _ in pickletools.genops(data):
            if op.name == "PROTO":
                protocol = arg
            elif op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle: damaged or another format
        return None
    foreign = sorted({n for n in names if not n.startswith("torch.") and n not in _PLAIN_GLOBALS})
    if foreign:
        what = f"it pickles Python objects ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
    elif kind == "pickle" and protocol is not None and protocol > 2:
        what = f"it is a plain Python pickle (protocol {protocol}), not written by torch.save"
    else:
        what = "it needs pickle features beyond tensors and plain containers"
    return (f"{path} is not a weights-only file: {what}, and unpickling such a file can run arbitrary code, so "
            "it is not loaded. Re-save the tensors from a trusted copy with safetensors or torch.save of a "
            "dict of tensors")
