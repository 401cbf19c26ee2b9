"""The SAE: TopK (Gao et al. 2024) and gradient-aware TopK (g-SAE, Olmo et al. 2024) selection.

Weights follow SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``,
and ``pre = (x - b_dec) @ W_enc + b_enc`` (``apply_b_dec_to_input``). Save/load use SAELens' v6 directory
layout (``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``), so either tool reads the other's
files. A g-SAE is saved as ``architecture: "topk"``: without a gradient it *is* a TopK SAE, and that is how
SAELens will run it; the training rule is kept in ``metadata.selection``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import nn

from . import __version__
from .files import ensure_dir, save_tensors, write_json
from .kernels import dense_pre, kernels_enabled, rowwise_dot, selected_pre, sparse_decode, topk_indices

Selection = Literal["topk", "gsae"]
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SUPPORTED_ARCHITECTURES = ("topk",)


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


class SAEFileError(ValueError):
    """An SAE directory or file that cannot be read: the message names the file and what is wrong."""


@dataclass
class SAEConfig:
    """Shape and rule of one SAE, plus where it was trained (SAELens' ``metadata``)."""

    d_in: int
    """Width of the activation vectors (n_heads*d_head for hook_z with all heads)."""
    d_sae: int
    """Number of latents."""
    k: int = 16
    """Active latents per token."""
    selection: Selection = "topk"
    """``topk``: largest pre-activations; ``gsae``: largest ``z_i * (1 + beta*|W_dec[i].g|)`` (needs a gradient)."""
    gsae_beta: float = 1.0
    """g-SAE weight of the gradient term; 0 reproduces TopK exactly."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens' default)."""
    dtype: str = "float32"
    """Parameter dtype."""
    device: str = "cpu"
    """Parameter device."""
    reshape_activations: Literal["none", "hook_z"] = "none"
    """``hook_z`` when the site is hook_z, so SAELens flattens [.., n_heads, d_head] itself."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """model_name, hook_name, hook_head_index, context_size, prepend_bos, ... (SAELens v6 ``metadata``)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive integer, got {value!r}")
        if self.k > self.d_sae:
            raise ValueError(f"SAEConfig.k ({self.k}) must not exceed d_sae ({self.d_sae})")
        if self.selection not in ("topk", "gsae"):
            raise ValueError(f"SAEConfig.selection must be 'topk' or 'gsae', got {self.selection!r}")
        if not math.isfinite(self.gsae_beta) or self.gsae_beta < 0:
            raise ValueError(f"SAEConfig.gsae_beta must be a finite number >= 0, got {self.gsae_beta!r}")
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(f"SAEConfig.reshape_activations must be 'none' or 'hook_z', got {self.reshape_activations!r}")
        if not hasattr(torch, self.dtype) or not isinstance(getattr(torch, self.dtype), torch.dtype):
            raise ValueError(f"SAEConfig.dtype must name a torch dtype such as 'float32', got {self.dtype!r}")

    def to_saelens_dict(self) -> dict[str, Any]:
        """cfg.json contents: SAELens v6 TopK fields, our rule kept in metadata."""
        meta = dict(self.metadata)
        # SAELens treats a cfg.json without metadata.sae_lens_version as pre-v6 and drops the metadata.
        meta.setdefault("sae_lens_version", "6.0.0")
        meta.update(selection=self.selection, gsae_beta=self.gsae_beta, sae_lens_attn_version=__version__)
        return {
            "architecture": "topk",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "rescale_acts_by_decoder_norm": False,
            "dtype": self.dtype,
            "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": self.reshape_activations,
            "metadata": meta,
        }

    @classmethod
    def from_saelens_dict(cls, d: dict[str, Any], source: str = "cfg.json") -> SAEConfig:
        arch = d.get("architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise SAEFileError(
                f"{source}: architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES}); "
                "only TopK SAEs can be loaded"
            )
        if d.get("normalize_activations", "none") != "none":
            raise SAEFileError(f"{source}: normalize_activations={d['normalize_activations']!r} is not supported; fold it first")
        if d.get("rescale_acts_by_decoder_norm", False):
            raise SAEFileError(f"{source}: rescale_acts_by_decoder_norm=True is not supported")
        missing = [key for key in ("d_in", "d_sae", "k") if key not in d]
        if missing:
            raise SAEFileError(f"{source}: missing field(s) {missing}")
        meta = dict(d.get("metadata") or {})
        # SAELens before v6 kept these at the top level; lift them into metadata.
        for key in ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "hook_layer"):
            if key in d and key not in meta:
                meta[key] = d[key]
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
        try:
            return cls(
                d_in=int(d["d_in"]),
                d_sae=int(d["d_sae"]),
                k=int(d["k"]),
                selection=selection,
                gsae_beta=float(beta),
                apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)),
                dtype=str(d.get("dtype", "float32")).removeprefix("torch."),
                device=str(d.get("device", "cpu")),
                reshape_activations=d.get("reshape_activations", "none"),
                metadata=meta,
            )
        except ValueError as err:
            raise SAEFileError(f"{source}: {err}") from err


class EncodeOutput(NamedTuple):
    """The k kept latents of each row, and how they were chosen."""

    values: Float[torch.Tensor, "batch k"]
    """Kept activations (ReLU of the pre-activation; never the g-SAE score)."""
    indices: Int[torch.Tensor, "batch k"]
    """Latent ids of the kept activations."""
    pre: Float[torch.Tensor, "batch d_sae"]
    """All pre-activations (outside autograd on the sparse path; use ``SAE.pre_at`` for gradients)."""
    selection: str
    """``topk``, ``gsae``, or ``topk (gsae without gradient)`` when a g-SAE had no gradient to use."""


class ForwardOutput(NamedTuple):
    x_hat: Float[torch.Tensor, "batch d_in"]
    code: EncodeOutput


class SAE(nn.Module):
    """A TopK / g-SAE over ``d_in``-wide activations."""

    def __init__(self, cfg: SAEConfig, init: bool = True):
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        kw = {"device": cfg.device, "dtype": dtype}
        # W_enc is [d_in, d_sae] as in SAELens, but laid out column-major (a transposed [d_sae, d_in] buffer):
        # the sparse step reads and writes whole encoder columns, which are then contiguous.
        self.W_enc = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw).T)
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        if init:
            self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder = decoder transpose (Gao et al. 2024, section 2.4)."""
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=torch.float32)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    # --- encoding -------------------------------------------------------------------------------------
    #: Run the selection GEMM under bf16 autocast (kept values are still recomputed in the weights' dtype).
    bf16_select: bool = False

    #: Trainers set this: ``encode`` then writes ``pre`` into one reused [batch, d_sae] buffer, so a returned
    #: ``EncodeOutput.pre`` is only valid until the next ``encode`` call (a fresh 400 MB tensor every step
    #: costs page faults on the CPU).
    reuse_pre_buffer: bool = False

    def _pre_buffer(self, xc: torch.Tensor, name: str = "_buf") -> torch.Tensor | None:
        """A reused [batch, d_sae] buffer in the selection dtype (``name``: one per use), or None when
        ``reuse_pre_buffer`` is off."""
        if not self.reuse_pre_buffer:
            return None
        shape = (xc.shape[0], self.cfg.d_sae)
        dtype = torch.bfloat16 if self.bf16_select else self.W_enc.dtype
        buf = self.__dict__.get(name)
        if buf is None or buf.shape != shape or buf.device != xc.device or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device=xc.device)
            self.__dict__[name] = buf
        return buf

    def center(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        x, b_dec = self._input(x)
        return x - b_dec if b_dec is not None else x

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` in the weights' dtype (width checked), and the b_dec to subtract from it (None: none)."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"input width {x.shape[-1]} does not match the SAE's d_in={self.cfg.d_in}")
        return x.to(self.W_enc.dtype), (self.b_dec if self.cfg.apply_b_dec_to_input else None)

    def encode_pre(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """All pre-activations ``(x - b_dec) @ W_enc + b_enc``, differentiable (dense)."""
        return self.center(x) @ self.W_enc + self.b_enc

    def pre_at(
        self, x: Float[torch.Tensor, "batch d_in"], indices: Int[torch.Tensor, "batch k"], pre: torch.Tensor | None = None
    ) -> Float[torch.Tensor, "batch k"]:
        """Differentiable pre-activations of the given latents only. ``pre``: the exact dense pre-activations
        if already computed (their values are reused; the backward is sparse either way)."""
        if not kernels_enabled():
            return (self.center(x) @ self.W_enc + self.b_enc).gather(-1, indices)
        x, b_dec = self._input(x)
        return selected_pre(x, b_dec, indices, self.W_enc, self.b_enc, None if self.bf16_select else pre)

    def gsae_scores(
        self,
        pre: Float[torch.Tensor, "batch d_sae"],
        grad: Float[torch.Tensor, "batch d_in"],
        out: torch.Tensor | None = None,
    ) -> Float[torch.Tensor, "batch d_sae"]:
        """``z_i * (1 + beta * |W_dec[i] . g|)`` with z = ReLU(pre): each latent's activation weighted by its
        first-order effect on the loss (Olmo et al. 2024, "Features that Make a Difference", the g-TopK
        rule). The gradient is data (detached), so selection itself is not differentiated.

        Where the paper is silent: latents with pre <= 0 (z = 0) all score 0 there; we keep their raw
        pre-activation as the score, so ties among them break exactly as in TopK and beta = 0 reproduces
        TopK's choice latent for latent (their kept value is 0 either way).

        Computed as ``max(pre, pre + pre * |beta*e|)``, which is that rule (the factor is >= 1, so the max
        picks the weighted score where pre > 0 and pre itself elsewhere): one GEMM (beta folded into the
        [batch, d_in] gradient, not applied to the [batch, d_sae] product) and three in-place passes over one
        [batch, d_sae] buffer (``out``, reused by trainers). The GEMM runs in ``pre``'s dtype: bf16 after a
        bf16 selection GEMM (``bf16_select``), else the weights' dtype.
        """
        pre = pre.detach()
        W_dec = self.W_dec.detach().to(pre.dtype)
        g = grad.detach().to(device=pre.device, dtype=pre.dtype) * self.cfg.gsae_beta
        if out is None or out.shape != pre.shape or out.dtype != pre.dtype:
            out = torch.empty_like(pre)
        torch.mm(g, W_dec.T, out=out).abs_()
        torch.addcmul(pre, pre, out, out=out)
        return torch.maximum(out, pre, out=out)

    def encode(self, x: Float[torch.Tensor, "batch d_in"], grad: torch.Tensor | None = None) -> EncodeOutput:
        """Choose k latents per row. A g-SAE uses ``grad`` (dL/dx at the site); without one it falls back to
        TopK and says so in ``selection``.

        Sparse path (default): the selection GEMM runs outside autograd and the kept values are recomputed
        from the k chosen encoder columns, so gradients touch only those. Reference path
        (``SAE_LENS_ATTN_KERNELS=reference``): dense autograd through the full pre-activation matrix.
        """
        fast = kernels_enabled()
        gsae = self.cfg.selection == "gsae" and grad is not None
        if fast:
            x, b_dec = self._input(x)
            with torch.no_grad():
                xc = x - b_dec if b_dec is not None else x
            # TopK adds b_enc inside the selection pass (topk_indices(bias=...)); the g-SAE needs it first
            pre = dense_pre(xc, self.W_enc, self.b_enc if gsae else None, bf16=self.bf16_select,
                            out=self._pre_buffer(xc))
        else:
            xc = self.center(x)
            pre = xc @ self.W_enc + self.b_enc
        k = self.cfg.k
        if gsae:
            indices = topk_indices(self.gsae_scores(pre, grad, out=self._pre_buffer(xc, "_score_buf")), k)
            rule = "gsae"
        else:
            indices = topk_indices(pre.detach(), k, bias=self.b_enc.detach() if fast else None)
            rule = "topk" if self.cfg.selection == "topk" else "topk (gsae without gradient)"
        if not fast:
            values = pre.gather(-1, indices).relu()
        else:  # after a bf16 selection the kept values are recomputed in the weights' dtype
            values = selected_pre(
                x, b_dec, indices, self.W_enc, self.b_enc, None if self.bf16_select else pre, x_centered=xc
            ).relu()
        return EncodeOutput(values, indices, pre, rule)

    def encode_dense(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """Dense latent activations (zeros off the top k), for analysis; the same as SAELens' ``encode``."""
        flat = x.reshape(-1, x.shape[-1])
        code = self.encode(flat)
        dense = torch.zeros(flat.shape[0], self.cfg.d_sae, dtype=code.values.dtype, device=flat.device)
        dense.scatter_(-1, code.indices, code.values)
        return dense.reshape(*x.shape[:-1], self.cfg.d_sae)

    # --- decoding -------------------------------------------------------------------------------------
    def decode(
        self, values: Float[torch.Tensor, "batch k"], indices: Int[torch.Tensor, "batch k"]
    ) -> Float[torch.Tensor, "batch d_in"]:
        return sparse_decode(values, indices, self.W_dec) + self.b_dec

    def decode_dense(self, acts: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Float[torch.Tensor, "batch d_in"], grad: torch.Tensor | None = None) -> ForwardOutput:
        code = self.encode(x, grad)
        return ForwardOutput(self.decode(code.values, code.indices), code)

    def reconstruct(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        """Reconstruction of any-shaped [..., d_in] input (TopK selection)."""
        flat = x.reshape(-1, x.shape[-1])
        return self.forward(flat).x_hat.reshape(x.shape).to(x.dtype)

    # --- decoder geometry (Gao et al. 2024; Bricken et al. 2023) ---------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row, so a step does not just rescale
        it; renormalising after the step then changes only its direction."""
        if self.W_dec.grad is None:
            return
        g = self.W_dec.grad
        parallel = rowwise_dot(g, self.W_dec)
        g.addcmul_(parallel.unsqueeze(1), self.W_dec, value=-1.0)

    # --- checking -------------------------------------------------------------------------------------
    def check_site(self, site, model, *, allow_transfer: bool | None = None) -> None:
        """Raise if this SAE cannot read ``site`` of ``model`` (a loaded model, or its ``cfg``).

        The site must exist and have the SAE's width; and, unless transfer is allowed, it must be the site
        and model in the SAE's metadata (layer, hook name, head, and model name when ``model`` is a model;
        fields the metadata lacks are not compared; :mod:`~sae_lens_attn.provenance` has the rule for model
        names). ``allow_transfer``: accept another site or model of the same width; None (default) means
        only inside a :func:`~sae_lens_attn.provenance.transfer_allowed` block.
        """
        from .provenance import SiteMismatchError, site_mismatches, transfer_is_allowed

        model_cfg = model.cfg if hasattr(model, "cfg") and hasattr(model, "parameters") else model
        site.validate(model_cfg)
        want = site.d_in(model_cfg)
        if want != self.cfg.d_in:
            raise ValueError(
                f"d_in mismatch: the SAE expects d_in={self.cfg.d_in}, but site {site.label} "
                f"({site.hook_name}) of this model has width {want}; load the SAE trained for this site"
            )
        if allow_transfer or (allow_transfer is None and transfer_is_allowed()):
            return
        from .models import model_name

        name = model_name(model) if model_cfg is not model else None
        problems = site_mismatches(self.cfg.metadata, site, name)
        if problems:
            raise SiteMismatchError(
                f"this SAE is applied to {site.label} ({site.hook_name}) but its metadata says it was trained "
                f"elsewhere: {'; '.join(problems)}. Apply it where it was trained, or pass allow_transfer=True "
                "(--allow-transfer) for a deliberate transfer experiment"
            )

    # --- files ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, log_sparsity: torch.Tensor | None = None) -> Path:
        """Write SAELens' v6 layout; each file is written to a temporary name and renamed, so a crash never
        leaves a half-written file under the final name. A failure to write raises
        :class:`~sae_lens_attn.files.WriteError` naming the file, the bytes needed and the free space."""
        path = ensure_dir(path)
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.named_parameters()}
        save_tensors(path / WEIGHTS_FILENAME, tensors)
        if log_sparsity is not None:
            save_tensors(path / SPARSITY_FILENAME, {"sparsity": log_sparsity.detach().float().contiguous().cpu()})
        write_json(path / CFG_FILENAME, self.cfg.to_saelens_dict(), indent=2)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> SAE:
        path = Path(path)
        cfg = read_config(path)
        if device is not None:
            cfg.device = str(device)
        sae = cls(cfg, init=False)
        tensors = _read_safetensors(path / WEIGHTS_FILENAME)
        expected = {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "W_dec": (cfg.d_sae, cfg.d_in),
            "b_enc": (cfg.d_sae,),
            "b_dec": (cfg.d_in,),
        }
        for name, shape in expected.items():
            if name not in tensors:
                raise SAEFileError(f"{path / WEIGHTS_FILENAME}: tensor {name!r} is missing (has {sorted(tensors)})")
            if tuple(tensors[name].shape) != shape:
                raise SAEFileError(
                    f"{path / WEIGHTS_FILENAME}: {name} has shape {tuple(tensors[name].shape)} but cfg.json "
                    f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}"
                )
        with torch.no_grad():
            for name in expected:
                getattr(sae, name).copy_(tensors[name])
        return sae

    @staticmethod
    def load_sparsity(path: str | os.PathLike) -> torch.Tensor | None:
        f = Path(path) / SPARSITY_FILENAME
        return _read_safetensors(f)["sparsity"] if f.exists() else None


def read_config(path: Path) -> SAEConfig:
    f = path / CFG_FILENAME
    return SAEConfig.from_saelens_dict(read_cfg_json(f), str(f))


def read_cfg_json(f: Path) -> dict[str, Any]:
    """An SAE directory's ``cfg.json`` as a dict, with an error naming the file for every way it can be bad."""
    if not f.exists():
        raise SAEFileError(f"{f.parent} is not an SAE directory: {f.name} is missing")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFileError(f"{f}: not valid JSON ({err}); the file is truncated or corrupted") from err
    if not isinstance(d, dict):
        raise SAEFileError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not f.exists():
        raise SAEFileError(f"{f} is missing")
    try:
        return load_file(str(f))
    except Exception as err:  # safetensors raises its own error type for truncated or corrupted files
        raise SAEFileError(f"{f}: unreadable safetensors file ({err}); it is truncated or corrupted") from err
