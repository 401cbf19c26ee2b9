"""The SAE interface every architecture shares, with SAELens' meanings.

``sae.encode(x)``: dense feature activations ``[..., d_sae]``; ``sae.decode(f)``: ``[..., d_in]``;
``sae(x)``: the reconstruction in ``x``'s shape. Any leading shape; a hook_z SAE
(``cfg.reshape_activations == "hook_z"``) also reads ``[..., n_heads, d_head]`` and flattens the heads
head-major, exactly as SAELens' ``reshape_activations`` (and :meth:`Site.flatten`) do.

Where we differ from SAELens, on purpose: SAELens' hook_z ``decode`` returns ``[..., n_heads, d_head]``,
reshaped with the ``d_head`` it remembered from the *last* ``encode`` call (mutable state: a decode before
any encode fails). Our ``decode`` keeps no state and always returns ``[..., d_in]``; ``sae(x)`` returns
``x``'s own shape, so ``sae(z)`` on ``[..., n_heads, d_head]`` is ``[..., n_heads, d_head]`` as in SAELens.
A width equal to ``d_in`` is always read as already flat.

The sparse path (trainer, evals): ``encode_sparse(x) -> SparseCode(values, indices, pre, selection)`` and
``decode_sparse(values, indices)``. Attribution (DFA, dashboards, circuits) reads the one linear map that
decides each feature, ``linear_encoder()`` / ``encode_pre(x)``.

Subclasses: :class:`~sae_lens_attn.saes.topk.TopKSAE` (TopK and g-SAE, the one we train),
:class:`~sae_lens_attn.saes.standard.StandardSAE`, ``JumpReLUSAE``, ``BatchTopKSAE``, ``GatedSAE``.
``SAE(cfg)`` builds the subclass named by ``cfg.architecture``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import einops
import torch
from jaxtyping import Float, Int
from torch import nn

from ..errors import InputError, UserError
from ..kernels import rowwise_dot, sparse_decode
from .config import REGISTRY, SAEConfig, register_architecture


class SparseCode(NamedTuple):
    """The active latents of each row (leading dims as the input's), and how they were chosen."""

    values: Float[torch.Tensor, "... k"]
    """Kept activations (never a g-SAE score). TopK: exactly k per row; other architectures: each row's
    active latents, padded with zeros to the largest count in the batch."""
    indices: Int[torch.Tensor, "... k"]
    """Latent ids of ``values``."""
    pre: Float[torch.Tensor, "... d_sae"]
    """All linear pre-activations (:meth:`SAE.encode_pre`; outside autograd on TopK's sparse path; for a
    trainer that sets ``reuse_pre_buffer``, valid only until the next call)."""
    selection: str
    """The rule that chose them: ``topk``, ``gsae``, ``topk (gsae without gradient)``, or the architecture's
    name (``standard``, ``jumprelu``, ``batchtopk``, ``gated``)."""


class NonFiniteOutputError(UserError, FloatingPointError):
    """An SAE gave inf/NaN from finite input: its weights overflow its dtype (the message names the SAE)."""


class LinearEncoder(NamedTuple):
    """The linear map whose value decides (and gives the magnitude of) each feature: ``pre = x @ W + b``."""

    W: Float[torch.Tensor, "d_in f"]
    b: Float[torch.Tensor, " f"]
    """Includes ``-b_dec @ W`` when the SAE subtracts b_dec from its input (``apply_b_dec_to_input``)."""


class SAE(nn.Module):
    """Base class of every SAE architecture. ``SAE(cfg)`` returns the subclass for ``cfg.architecture``
    (``SAE(SAEConfig(d_in=..., d_sae=..., k=...))`` is a :class:`TopKSAE`); ``SAE.load(dir)`` the one
    the files name."""

    #: The SAEConfig.architecture this class implements (set by each subclass; defining the subclass
    #: registers it).
    architecture: ClassVar[str] = ""
    #: The architecture its cfg.json names, when not ``architecture`` (BatchTopK is saved as ``jumprelu``).
    saelens_name: ClassVar[str | None] = None
    #: Where it was loaded from (``SAE.load`` sets it); names the SAE in errors.
    source: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("architecture"):
            register_architecture(cls, cls.__dict__["architecture"], cls.__dict__.get("saelens_name"))

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is SAE:
            cfg = args[0] if args else kwargs.get("cfg")
            if not isinstance(cfg, SAEConfig):
                raise TypeError(f"SAE(cfg) needs an SAEConfig, got {type(cfg).__name__}")
            cls = sae_class(cfg.architecture)
        return super().__new__(cls)

    def __init__(self, cfg: SAEConfig, init: bool = True):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise InputError(
                f"{type(self).__name__} needs SAEConfig.architecture={self.architecture!r}, got "
                f"{cfg.architecture!r}; SAE(cfg) builds the class the config names"
            )
        self.cfg = cfg

    def _empty(self, *shape: int, column_major: bool = False) -> nn.Parameter:
        """A parameter in the config's dtype and device. ``column_major``: a [a, b] matrix stored as the
        transpose of a contiguous [b, a] buffer (W_enc: the sparse step reads whole encoder columns)."""
        kw = {"device": self.cfg.device, "dtype": getattr(torch, self.cfg.dtype)}
        if column_major:
            return nn.Parameter(torch.empty(*reversed(shape), **kw).T)
        return nn.Parameter(torch.zeros(*shape, **kw))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder = decoder transpose (Gao et al. 2024, section 2.4); every
        other parameter (biases, thresholds, r_mag) 0."""
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=torch.float32)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
            for name, p in self.named_parameters():
                if name not in ("W_enc", "W_dec"):
                    p.zero_()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    # --- input ----------------------------------------------------------------------------------------
    def flat_input(self, x: torch.Tensor) -> Float[torch.Tensor, "... d_in"]:
        """``x`` as ``[..., d_in]``: as it is when its last dim is d_in; ``[..., n_heads, d_head]`` flattened
        head-major for a hook_z SAE. Anything else raises, naming the shape and the fix."""
        d_in = self.cfg.d_in
        if x.shape[-1:] == (d_in,):
            return x
        if self.cfg.reshape_activations == "hook_z" and x.dim() >= 2 and x.shape[-2] * x.shape[-1] == d_in:
            return einops.rearrange(x, "... head d_head -> ... (head d_head)")
        if x.dim() >= 2 and x.shape[-2] * x.shape[-1] == d_in:
            raise InputError(
                f"input of shape {tuple(x.shape)}: its last dim {x.shape[-1]} is not the SAE's d_in={d_in}, and "
                "this SAE's reshape_activations is 'none': flatten the heads first (Site.flatten)"
            )
        raise InputError(f"input width {x.shape[-1]} does not match the SAE's d_in={d_in} (input shape {tuple(x.shape)})")

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` flat, in the weights' dtype, and the b_dec to subtract from it (None: none)."""
        return self.flat_input(x).to(self.W_enc.dtype), (self.b_dec if self.cfg.apply_b_dec_to_input else None)

    def center(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        """The encoder's input: ``x - b_dec`` (with apply_b_dec_to_input), flat, in the weights' dtype."""
        x, b_dec = self._input(x)
        return x - b_dec if b_dec is not None else x

    # --- the linear pre-activation (attribution reads this) --------------------------------------------
    def _pre_weights(self, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of the pre-activation ``center(x) @ W + b`` for latents ``ids`` (all when None)."""
        if ids is None:
            return self.W_enc, self.b_enc
        return self.W_enc[:, ids], self.b_enc[ids]

    def encode_pre(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """All linear pre-activations (differentiable, dense): the values that decide each feature and give
        its magnitude. ``(x - b_dec) @ W_enc + b_enc`` for TopK, ReLU and JumpReLU (TopK and JumpReLU compare
        them with the k-th largest / the threshold); the magnitude path for gated SAEs."""
        W, b = self._pre_weights()
        return self.center(x) @ W + b

    def linear_encoder(self, features: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> LinearEncoder:
        """``encode_pre`` as one affine map on the flat input, ``pre = x @ W + b``, for ``features`` (latent
        ids; all when None), b_dec folded into ``b``; in ``dtype`` (default: the weights'). DFA and every
        attribution split ``x @ W`` exactly. TopK, ReLU, JumpReLU: ``W = W_enc``, ``b = b_enc - b_dec @ W_enc``;
        gated: the magnitude path (see :class:`~sae_lens_attn.saes.gated.GatedSAE`)."""
        ids = None if features is None else torch.as_tensor(features, dtype=torch.long, device=self.W_enc.device)
        W, b = self._pre_weights(ids)
        if dtype is not None:
            W, b = W.to(dtype), b.to(dtype)
        if self.cfg.apply_b_dec_to_input:
            b = b - self.b_dec.to(W.dtype) @ W
        return LinearEncoder(W, b)

    # --- dense calls, SAELens' meanings ----------------------------------------------------------------
    def activate(self, pre: torch.Tensor, x_centered: torch.Tensor) -> torch.Tensor:
        """The activation function: feature activations from the pre-activations (and, for gated SAEs, the
        centred input the gate reads)."""
        raise NotImplementedError

    # The dense calls check their output (inf/NaN from finite input is an overflow, named here rather than
    # found three analyses later). The sparse calls the trainer makes every step do not pay for it.
    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """Dense feature activations, ``[..., d_sae]`` (SAELens' ``encode``)."""
        return self._checked(self._encode(x), x, "encode")

    def _encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        xc = self.center(x)
        W, b = self._pre_weights()
        return self.activate(xc @ W + b, xc)

    def decode(self, feats: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        """``feats @ W_dec + b_dec``, ``[..., d_in]`` (flat also for a hook_z SAE: see the module docstring)."""
        return self._checked(self._decode(feats), feats, "decode")

    def _decode(self, feats: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        return feats.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``decode(encode(x))``, in ``x``'s shape (SAELens' ``forward``)."""
        return self._checked(self._reconstruct(self.flat_input(x)), x, "forward").reshape(x.shape)

    def _reconstruct(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        return self._decode(self._encode(x))

    def _checked(self, out: torch.Tensor, given: torch.Tensor, call: str) -> torch.Tensor:
        """``out``, or :class:`NonFiniteOutputError` when it holds inf/NaN although ``given`` is finite."""
        # A finite sum proves every element finite in one reduction (8x cheaper than isfinite().all() on the
        # CPU, ~5% of the encoder's matmul); only a non-finite sum, or one that overflowed, looks closer.
        if bool(torch.isfinite(out.sum(dtype=torch.float64 if out.dtype == torch.float64 else torch.float32))):
            return out
        if bool(torch.isfinite(out).all()) or not bool(torch.isfinite(given).all()):
            return out
        with torch.no_grad():
            largest = max(float(p.abs().max()) for p in self.parameters() if p.numel())
        half = self.dtype in (torch.float16, torch.bfloat16)
        name = self.source or f"the {self.architecture} SAE on {self.cfg.metadata.get('hook_name', 'its site')}"
        raise NonFiniteOutputError(
            f"{name}: {call} gave inf/NaN from finite input: its weights (largest |w| {largest:.3g}) overflow "
            f"{str(self.dtype).removeprefix('torch.')}. Compute in a wider dtype (SAE.load(path, "
            f"dtype={'float32' if half else 'float64'!r}) or sae.to({'torch.float32' if half else 'torch.float64'})),"
            " or check the weights"
        )

    # --- sparse calls ----------------------------------------------------------------------------------
    def encode_sparse(self, x: Float[torch.Tensor, "... d_in"], grad: torch.Tensor | None = None) -> SparseCode:
        """Each row's active latents (see :class:`SparseCode`). ``grad``: the g-SAE rule's dL/dx, which
        only a TopK SAE with ``selection='gsae'`` uses."""
        if grad is not None:
            raise InputError(f"a {self.architecture} SAE has no gradient-aware selection; pass grad=None")
        xc = self.center(x)
        W, b = self._pre_weights()
        pre = xc @ W + b
        acts = self.activate(pre, xc)
        width = max(1, int((acts > 0).sum(-1).max())) if acts.numel() else 1
        values, indices = acts.topk(min(width, self.cfg.d_sae), dim=-1, sorted=False)
        return SparseCode(values, indices, pre, self.architecture)

    def decode_sparse(
        self, values: Float[torch.Tensor, "... k"], indices: Int[torch.Tensor, "... k"]
    ) -> Float[torch.Tensor, "... d_in"]:
        """``sum_j values[.., j] * W_dec[indices[.., j]] + b_dec`` without the dense code."""
        if values.dim() == 2:
            return sparse_decode(values, indices, self.W_dec) + self.b_dec
        lead = values.shape[:-1]
        flat = sparse_decode(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]), self.W_dec)
        return flat.reshape(*lead, self.cfg.d_in) + self.b_dec

    # --- deprecated aliases (no caller in this package uses them) --------------------------------------
    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Deprecated: ``encode`` is dense now."""
        return self.encode(x)

    def decode_dense(self, feats: torch.Tensor) -> torch.Tensor:
        """Deprecated: ``decode`` is dense now."""
        return self.decode(feats)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deprecated: ``sae(x)`` (this one returns ``x``'s dtype)."""
        return self(x).to(x.dtype)

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
        from ..provenance import SiteMismatchError, site_mismatches, transfer_is_allowed

        model_cfg = model.cfg if hasattr(model, "cfg") and hasattr(model, "parameters") else model
        site.validate(model_cfg)
        want = site.d_in(model_cfg)
        if want != self.cfg.d_in:
            raise InputError(
                f"d_in mismatch: the SAE expects d_in={self.cfg.d_in}, but site {site.label} "
                f"({site.hook_name}) of this model has width {want}; load the SAE trained for this site"
            )
        if allow_transfer or (allow_transfer is None and transfer_is_allowed()):
            return
        from ..models import model_name

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
        """Write SAELens' v6 layout under this architecture's SAELens name (atomically, file by file)."""
        from .files import write_sae_dir

        tensors = {n: t.detach().contiguous().cpu() for n, t in self.state_dict().items()}
        return write_sae_dir(Path(path), tensors, self.cfg.to_saelens_dict(), log_sparsity)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> SAE:
        """Load any SAE directory SAELens or we wrote (any architecture, any SAELens version), or a Kissane
        et al. ``.pt`` file; returns the subclass for its architecture. ``device``: None (default) is the CPU,
        whatever device cfg.json records (where it was trained); ``dtype``: None keeps the file's."""
        from .files import SAEFileError
        from .loading import load_sae

        sae = load_sae(path, device, dtype)
        if not isinstance(sae, cls):
            raise SAEFileError(f"{path} holds a {sae.architecture} SAE, not a {cls.__name__}; load it with SAE.load")
        return sae

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, *, device: str | torch.device | None = None,
                        local_dir: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None) -> SAE:
        """A published attention SAE by SAELens' release and SAE id (see ``sae_lens_attn.saes.pretrained``);
        on the CPU unless ``device`` is given."""
        from .pretrained import from_pretrained

        return from_pretrained(release, sae_id, device=device, local_dir=local_dir, dtype=dtype)

    @staticmethod
    def load_sparsity(path: str | os.PathLike) -> torch.Tensor | None:
        from .files import SPARSITY_FILENAME, read_safetensors

        f = Path(path) / SPARSITY_FILENAME
        return read_safetensors(f)["sparsity"] if f.exists() else None


def sae_class(architecture: str) -> type[SAE]:
    """The SAE subclass implementing ``architecture`` (the built-in ones are defined, so registered, when
    ``sae_lens_attn.saes`` is imported)."""
    if architecture not in REGISTRY:
        raise InputError(f"no SAE class for architecture {architecture!r} (known: {sorted(REGISTRY)})")
    return REGISTRY[architecture].cls
