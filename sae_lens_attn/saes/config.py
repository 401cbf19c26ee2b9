"""One SAE's configuration, and its cfg.json in SAELens' v6 layout (written and read back)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import __version__
from ..errors import InputError

Selection = Literal["topk", "gsae"]

#: The SAELens file-format version our files claim (the v6 layout). SAELens reads a config without
#: ``metadata.sae_lens_version`` >= 6 through its pre-6 converter, which drops the metadata.
SAELENS_FORMAT_VERSION = "6.0.0"
#: Largest d_in, d_sae or k: 64x the widest published SAE (2**24 latents); beyond it a value is damage.
MAX_WIDTH = 1 << 30
#: Parameter dtypes an SAE computes in (float8 has no matmul; integers cannot hold weights).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def version_tuple(v: str) -> tuple[int, ...]:
    """``"0.10.2rc1"`` -> ``(0, 10, 2)``: enough to order release versions without ``packaging``."""
    out = []
    for piece in str(v).split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        out.append(int(digits) if digits else 0)
    return tuple(out)


@dataclass(frozen=True)
class ArchitectureInfo:
    """One SAE architecture as the config and the files know it; registered by its class."""

    name: str
    """``SAEConfig.architecture``."""
    saelens_name: str
    """The architecture cfg.json names (BatchTopK is saved for inference as ``jumprelu``; the name above then
    goes into ``metadata.training_architecture``)."""
    cls: type
    """The :class:`~sae_lens_attn.saes.base.SAE` subclass implementing it."""


#: Every SAE architecture by name, in registration order. A subclass of ``SAE`` with a class attribute
#: ``architecture`` registers itself when it is defined (``SAE.__init_subclass__``): that is all a new
#: architecture needs.
REGISTRY: dict[str, ArchitectureInfo] = {}


def register_architecture(cls: type, name: str, saelens_name: str | None = None) -> None:
    REGISTRY[name] = ArchitectureInfo(name, saelens_name or name, cls)


#: Checks of the SAEConfig fields one architecture owns, by the checking function's qualified name. SAELens'
#: cfg.json is flat, so such a field (TopK's ``k``, ``selection``, ``gsae_beta``) sits on every SAEConfig,
#: and its architecture's module registers the check (:func:`register_field_check`); every config runs
#: every check, whatever its architecture (a g-SAE ``selection`` on a JumpReLU config is refused).
FIELD_CHECKS: dict[str, Callable[[SAEConfig], None]] = {}


def register_field_check(check: Callable[[SAEConfig], None]) -> None:
    """Run ``check(cfg)`` on every SAEConfig (after the architecture is known to be registered); it raises
    :class:`~sae_lens_attn.errors.InputError` for a bad value."""
    FIELD_CHECKS[f"{check.__module__}.{check.__qualname__}"] = check


def architectures() -> tuple[str, ...]:
    """The names of the registered architectures."""
    return tuple(REGISTRY)


class SAEFileError(InputError):
    """An SAE directory or file that cannot be read: the message names the file and what is wrong."""


@dataclass
class SAEConfig:
    """Shape and rule of one SAE, plus where it was trained (SAELens' ``metadata``)."""

    d_in: int
    """Width of the activation vectors (n_heads*d_head for hook_z with all heads)."""
    d_sae: int
    """Number of latents."""
    # k, selection and gsae_beta belong to TopK (saes/topk.py checks them) but sit here: SAELens' cfg.json
    # is flat (``k`` at the top level), and SAEConfig(d_in=..., d_sae=..., k=...) is the public constructor.
    k: int = 16
    """Active latents per token (``topk`` only; the other architectures ignore it)."""
    selection: Selection = "topk"
    """``topk``: largest pre-activations; ``gsae``: largest ``z_i * (1 + beta*|W_dec[i].g|)`` (needs a gradient;
    ``topk`` architecture only)."""
    gsae_beta: float = 1.0
    """g-SAE weight of the gradient term; 0 reproduces TopK exactly."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens' default)."""
    dtype: str = "float32"
    """Parameter dtype."""
    device: str = "cpu"
    """Parameter device."""
    reshape_activations: Literal["none", "hook_z"] = "none"
    """``hook_z``: the SAE also reads ``[..., n_heads, d_head]`` input and flattens the heads itself, head-major
    (as SAELens does for hook_z SAEs)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """model_name, hook_name, hook_head_index, context_size, prepend_bos, ... (SAELens v6 ``metadata``)."""
    architecture: str = "topk"
    """Activation function, as SAELens names it: ``topk`` (TopK / g-SAE, the one we train), ``batchtopk``
    (BatchTopK as SAELens stores it for inference: JumpReLU with one threshold), ``jumprelu``, ``standard``
    (ReLU), ``gated``, or any other registered architecture (:data:`REGISTRY`)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_WIDTH:
                raise InputError(f"SAEConfig.{name} must be a positive integer of at most {MAX_WIDTH:,}, got {value!r}")
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise InputError(f"SAEConfig.apply_b_dec_to_input must be True or False, got {self.apply_b_dec_to_input!r}")
        if self.architecture not in REGISTRY:
            raise InputError(f"SAEConfig.architecture must be one of {architectures()}, got {self.architecture!r}")
        for check in FIELD_CHECKS.values():  # the fields one architecture owns (TopK: k, selection, gsae_beta)
            check(self)
        if self.reshape_activations not in ("none", "hook_z"):
            raise InputError(f"SAEConfig.reshape_activations must be 'none' or 'hook_z', got {self.reshape_activations!r}")
        if not isinstance(self.dtype, str) or getattr(torch, self.dtype, None) not in FLOAT_DTYPES:
            raise InputError(f"SAEConfig.dtype must be a floating-point dtype (float32, float64, float16 or "
                             f"bfloat16), got {self.dtype!r}")

    def to_saelens_dict(self) -> dict[str, Any]:
        """cfg.json contents in SAELens' v6 layout, under this architecture's SAELens name.

        TopK keeps our training rule in ``metadata.selection``/``gsae_beta`` (a g-SAE without a gradient *is*
        TopK). BatchTopK is written as SAELens writes it for inference: ``architecture: "jumprelu"`` with
        ``metadata.training_architecture: "batchtopk"``.
        """
        meta = dict(self.metadata)
        # SAELens treats a cfg.json without metadata.sae_lens_version as pre-v6 and drops the metadata.
        meta["sae_lens_version"] = SAELENS_FORMAT_VERSION
        meta["sae_lens_attn_version"] = __version__
        arch = REGISTRY[self.architecture].saelens_name
        extra: dict[str, Any] = {}
        if self.architecture == "topk":
            meta.update(selection=self.selection, gsae_beta=self.gsae_beta)
            extra = {"k": self.k, "rescale_acts_by_decoder_norm": False}
        elif arch != self.architecture:
            meta["training_architecture"] = self.architecture
        return {
            "architecture": arch,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            **extra,
            "dtype": self.dtype,
            "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": self.reshape_activations,
            "metadata": meta,
        }

    @classmethod
    def from_saelens_dict(cls, d: dict[str, Any], source: str = "cfg.json") -> SAEConfig:
        """The config of a v6 cfg.json (``sae_lens_attn.saes.loading`` converts older ones first).

        Functions SAELens computes at run time (``rescale_acts_by_decoder_norm``, ``normalize_activations``)
        must have been folded into the weights by the caller; they are refused here.
        """
        arch = d.get("architecture")
        meta = dict(d.get("metadata") or {})
        trained = REGISTRY.get(str(meta.get("training_architecture")))
        if trained is not None and trained.name != arch and trained.saelens_name == arch:
            arch = trained.name  # saved under another architecture's SAELens name (BatchTopK as jumprelu)
        if arch not in REGISTRY:
            raise SAEFileError(f"{source}: architecture {arch!r} is not supported (supported: {architectures()})")
        if d.get("normalize_activations", "none") != "none":
            raise SAEFileError(f"{source}: normalize_activations={d['normalize_activations']!r} is not supported; fold it first")
        if d.get("rescale_acts_by_decoder_norm", False):
            raise SAEFileError(f"{source}: rescale_acts_by_decoder_norm=True must be folded into the weights first")
        missing = [key for key in ("d_in", "d_sae") + (("k",) if arch == "topk" else ()) if key not in d]
        if missing:
            raise SAEFileError(f"{source}: missing field(s) {missing}")
        selection = meta.pop("selection", "topk")
        beta = meta.pop("gsae_beta", 1.0)
        # File-format stamps, not user metadata: to_saelens_dict writes them again.
        meta.pop("sae_lens_version", None)
        meta.pop("sae_lens_training_version", None)
        theirs = meta.pop("sae_lens_attn_version", None)
        if theirs is not None and version_tuple(str(theirs)) > version_tuple(__version__):
            raise SAEFileError(
                f"{source}: written by sae_lens_attn {theirs}, newer than this sae_lens_attn {__version__}; "
                "upgrade sae_lens_attn to read it"
            )
        if REGISTRY[arch].saelens_name != arch:
            meta.pop("training_architecture", None)
        try:
            return cls(
                d_in=int(d["d_in"]),
                d_sae=int(d["d_sae"]),
                **({"k": int(d["k"])} if arch == "topk" else {}),
                selection=selection if arch == "topk" else "topk",
                gsae_beta=float(beta) if isinstance(beta, int | float) and not isinstance(beta, bool) else beta,
                apply_b_dec_to_input=d.get("apply_b_dec_to_input", True),  # a JSON boolean: "no" is refused
                dtype=str(d.get("dtype", "float32")).removeprefix("torch."),
                device=str(d.get("device", "cpu")),
                reshape_activations=d.get("reshape_activations", "none"),
                metadata=meta,
                architecture=arch,
            )
        except (TypeError, ValueError) as err:
            raise SAEFileError(f"{source}: {err}") from err
