import json

import pytest
import torch

from sae_lens_attn.activations import NonFiniteActivationError, SiteBatch
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site
from sae_lens_attn.training.trainer import OptimConfig, Trainer, latest_checkpoint, lr_factor


def planted_batches(dictionary: torch.Tensor, n_active: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n, d = dictionary.shape
    while True:
        idx = torch.rand(batch, n, generator=g).topk(n_active, dim=-1).indices
        mags = torch.rand(batch, n_active, generator=g) + 0.5
        x = torch.einsum("bk,bkd->bd", mags, dictionary[idx]) + 0.01 * torch.randn(batch, d, generator=g)
        yield {Site(0): SiteBatch(x, None)}


def make(d_in, d_sae, k, seed=0):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def test_planted_dictionary_is_recovered():
    g = torch.Generator().manual_seed(1)
    true = torch.randn(48, 32, generator=g)
    true /= true.norm(dim=1, keepdim=True)
    sae = make(32, 96, 3)
    trainer = Trainer({Site(0): sae}, OptimConfig(lr=4e-3, steps=1500, warmup_steps=20, dead_tokens=20_000))
    trainer.fit(planted_batches(true, 3, 512, seed=2))
    cos = (true @ sae.W_dec.detach().T).max(dim=1).values
    recovered = (cos >= 0.9).float().mean().item()
    assert recovered >= 0.9, f"only {recovered:.0%} of planted directions recovered (cos >= 0.9)"


def test_dead_latents_are_tracked_and_auxk_revives_them():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(16, 8, generator=g)
    sae = make(8, 64, 2)
    cfg = OptimConfig(lr=1e-3, steps=60, warmup_steps=0, dead_tokens=1024, auxk_alpha=0.0)
    tr = Trainer({Site(0): sae}, cfg)
    stats = tr.fit(planted_batches(true, 2, 256, 0))
    assert stats[Site(0)].dead_fraction > 0  # with no AuxK, latents die
    assert stats[Site(0)].auxk == 0.0
    sae2 = make(8, 64, 2)
    tr2 = Trainer({Site(0): sae2}, OptimConfig(lr=1e-3, steps=60, warmup_steps=0, dead_tokens=1024, auxk_alpha=1 / 32))
    stats2 = tr2.fit(planted_batches(true, 2, 256, 0))
    assert stats2[Site(0)].auxk > 0


def test_lr_schedule():
    cfg = OptimConfig(steps=100, warmup_steps=10, decay_fraction=0.2)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(50, cfg) == 1.0
    assert lr_factor(90, cfg) == pytest.approx(0.5)
    assert lr_factor(99, cfg) == pytest.approx(0.05)


def test_checkpoints_are_complete_and_restorable(tmp_path):
    true = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    cfg = OptimConfig(lr=1e-3, steps=20, warmup_steps=0, checkpoint_every=10, log_every=5)
    tr = Trainer({Site(0): make(8, 32, 2)}, cfg, tmp_path)
    tr.fit(planted_batches(true, 2, 64, 0))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_00000020"
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [5, 10, 15, 20] and all(r["site"] == "L0.z" for r in logs)
    tr2 = Trainer({Site(0): make(8, 32, 2, seed=5)}, cfg)
    tr2.restore(ckpt)
    assert tr2.step_idx == 20
    assert torch.equal(tr2.states[Site(0)].sae.W_dec, tr.states[Site(0)].sae.W_dec)
    assert torch.equal(tr2.states[Site(0)].tokens_since_fired, tr.states[Site(0)].tokens_since_fired)


def test_nan_batch_stops_with_message_naming_last_checkpoint(tmp_path):
    true = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    good = planted_batches(true, 2, 64, 0)

    def stream():
        for i, b in enumerate(good):
            if i == 12:
                yield {Site(0): SiteBatch(torch.full((64, 8), float("nan")), None)}
            yield b

    cfg = OptimConfig(lr=1e-3, steps=30, warmup_steps=0, checkpoint_every=10)
    tr = Trainer({Site(0): make(8, 32, 2)}, cfg, tmp_path)
    with pytest.raises(NonFiniteActivationError, match="step_00000010"):
        tr.fit(stream())
    assert latest_checkpoint(tmp_path).name == "step_00000010"


@pytest.mark.parametrize("bad", [[float("inf"), float("-inf")], [float("inf")], [float("nan"), 1.0]])
def test_non_finite_values_are_counted_even_when_a_column_sum_hides_their_sign(bad):
    """+inf and -inf in one column sum to NaN, a lone inf to inf: either way the step refuses the batch and
    counts the bad values themselves."""
    from sae_lens_attn.training.trainer import SiteState

    state = SiteState(make(8, 32, 2), OptimConfig(steps=5, warmup_steps=0))
    x = torch.randn(16, 8)
    x[: len(bad), 3] = torch.tensor(bad)
    n_bad = int((~torch.isfinite(x)).sum())
    with pytest.raises(NonFiniteActivationError, match=rf"step 4: {n_bad} non-finite value\(s\); "):
        state.step(SiteBatch(x, None), 4)
    state.step(SiteBatch(torch.randn(16, 8), None), 4)  # a good batch after it still trains


def test_float64_batch_whose_sums_overflow_is_refused_without_blaming_nan():
    from sae_lens_attn.training.trainer import SiteState

    state = SiteState(SAE(SAEConfig(d_in=8, d_sae=32, k=2, dtype="float64")), OptimConfig(steps=3, warmup_steps=0))
    x = torch.randn(16, 8, dtype=torch.float64)
    x[:2, 0] = 1e308
    with pytest.raises(NonFiniteActivationError, match=r"step 0: no NaN/inf, but its column sums overflow float64; .*rescale"):
        state.step(SiteBatch(x, None), 0)


@pytest.mark.parametrize("auxk_k,n_dead", [(16, 40), (2, 300)])  # dense-over-dead path, then the sparse one
def test_auxk_reconstruction_matches_masked_topk_definition(auxk_k, n_dead):
    from sae_lens_attn.training.trainer import SiteState

    gen = torch.Generator().manual_seed(11)
    sae = SAE(SAEConfig(d_in=24, d_sae=512, k=8), init=False)
    sae.reset_parameters(gen)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2, generator=gen)
        sae.b_dec.normal_(0, 0.2, generator=gen)
    state = SiteState(sae, OptimConfig(auxk_k=auxk_k))
    dead = torch.zeros(512, dtype=torch.bool)
    dead[torch.randperm(512, generator=gen)[:n_dead]] = True
    x = torch.randn(64, 24, generator=gen)

    def grads(fn):
        sae.zero_grad(set_to_none=True)
        out = fn()
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}

    pre = sae.encode_sparse(x).pre
    got = grads(lambda: state._auxk_reconstruction(x, pre, dead, n_dead))

    def reference():
        full = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        idx = full.detach().masked_fill(~dead, float("-inf")).topk(min(auxk_k, n_dead), dim=-1).indices
        return torch.einsum("bk,bkd->bd", full.gather(1, idx).relu(), sae.W_dec[idx])

    want = grads(reference)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-5, msg=name)
