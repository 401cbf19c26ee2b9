"""The streamed batches, and resuming them at batch ``skip`` without harvesting what was already served."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

import sae_lens_attn.activations as activations
import sae_lens_attn.training.run as run
from sae_lens_attn.activations import SiteBatch
from sae_lens_attn.models import SAMPLE_TEXT
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.stream import _ShuffleBuffer, activation_batches
from sae_lens_attn.training.config import TrainConfig
from sae_lens_attn.training.trainer import latest_checkpoint
from tests.conftest import random_rows
from tests.faults import WriteFault

SITES = [Site(0), Site(1, head=1)]


class _Counted:
    """``activations.harvest`` wrapped to record the rows of every call."""

    def __init__(self, monkeypatch):
        self.rows: list[torch.Tensor] = []
        real = activations.harvest

        def counted(model, tokens, *a, **kw):
            self.rows.append(tokens.clone())
            return real(model, tokens, *a, **kw)

        monkeypatch.setattr(activations, "harvest", counted)


def _same(a: dict[Site, SiteBatch], b: dict[Site, SiteBatch]) -> bool:
    return all(torch.equal(a[s].acts, b[s].acts) and (a[s].grads is None) == (b[s].grads is None)
               and (a[s].grads is None or torch.equal(a[s].grads, b[s].grads)) for s in a)


@pytest.mark.parametrize(("skip", "with_grad", "epochs"), [(0, False, 3), (1, False, 3), (5, False, 3),
                                                            (9, True, 3), (14, False, None), (40, False, 2)])
def test_skip_serves_exactly_the_batches_after_skip(tiny_neox, skip, with_grad, epochs):
    """Batches from ``skip`` on equal the full stream's, bit for bit, including across drains (48-token
    buffer, 32-token batches: a drain serves one batch mid-buffer), chunk boundaries, epochs and the final
    drain (``epochs=2``: 24 batches in all, so nothing is left after 40)."""
    rows = random_rows(tiny_neox, rows=12, n=9, seed=skip)
    kw = dict(model_batch_rows=2, buffer_tokens=48, with_grad=with_grad, seed=3, epochs=epochs)
    full = list(itertools.islice(activation_batches(tiny_neox, rows, SITES, 8, **kw), skip + 20))
    skipped = list(itertools.islice(activation_batches(tiny_neox, rows, SITES, 8, skip=skip, **kw), 20))
    assert len(skipped) == len(full[skip:])
    assert all(_same(a, b) for a, b in zip(full[skip:], skipped, strict=True))


def test_a_late_skip_harvests_only_rows_still_to_be_served(tiny_neox, monkeypatch):
    """Skipping 60 batches (five epochs of 12 rows) serves what the replay serves, and harvests fewer than
    half the chunks the replay harvests: only those with vectors still in the buffer at batch 60, and the
    ones after."""
    rows = random_rows(tiny_neox, rows=12, n=9, seed=1)  # 12 rows x 8 kept tokens; chunks of 2 rows
    kw = dict(model_batch_rows=2, buffer_tokens=48, seed=0)
    replay = _Counted(monkeypatch)
    full = list(itertools.islice(activation_batches(tiny_neox, rows, [Site(1)], 8, **kw), 80))
    skipping = _Counted(monkeypatch)
    told: list[str] = []
    served = list(itertools.islice(activation_batches(tiny_neox, rows, [Site(1)], 8, skip=60, log=told.append, **kw),
                                   20))
    assert all(_same(a, b) for a, b in zip(full[60:], served, strict=True))
    n_replay, n_skip = len(replay.rows) - len(skipping.rows), len(skipping.rows)
    assert n_replay >= 40 and 10 <= n_skip < n_replay / 2, (n_replay, n_skip)
    again, poured = map(int, re.fullmatch(r"resume at batch 60: (\d+) of the (\d+) chunks of 2 rows poured before "
                                          r"it still hold vectors to serve and are harvested again; the rest are not",
                                          told[0]).groups())
    assert 30 <= poured < n_replay and 0 < again < n_skip  # 60 batches of 8 hold 30 chunks' vectors


def test_placeholders_take_the_harvests_dtype():
    """A placeholder poured before the first harvest is recast to the harvest's dtype (zeros are exact), so
    the buffer concatenates one dtype."""
    buf = _ShuffleBuffer([Site(0)], True, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    buf.add_placeholder(3, {Site(0): 4})
    acts = torch.ones(5, 4, dtype=torch.bfloat16)
    buf.add({Site(0): SiteBatch(acts, acts * 2)})
    assert {t.dtype for t in buf.store[Site(0)] + buf.gstore[Site(0)]} == {torch.bfloat16}
    batches = list(buf.drain(final=True))
    got = torch.cat([b[Site(0)].acts for b in batches])
    assert len(batches) == 4 and got.dtype == torch.bfloat16
    assert int((got == 0).all(-1).sum()) == 3 and int((got == 1).all(-1).sum()) == 5


def test_skip_below_zero_is_refused(tiny_neox):
    with pytest.raises(ValueError, match="skip must be >= 0"):
        next(activation_batches(tiny_neox, random_rows(tiny_neox, rows=2, n=8), [Site(0)], 4, skip=-1))


def test_streamed_run_resumed_after_a_failed_checkpoint_equals_the_uninterrupted_run(tiny_neox_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    """The main job on the streaming path (activations over the in-memory limit): the disk refuses the
    second checkpoint, the run stops; ``--resume`` from the first checkpoint ends with the uninterrupted run's
    SAE, bit for bit. (The default 64k-token buffer holds all of this small run, so every chunk is still
    needed here; what a late resume saves is the test above.)"""
    monkeypatch.setattr(run, "IN_MEMORY_BYTES", 0)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT.read_text()[:12_000])

    def cfg(out, **kw):
        return TrainConfig(model=tiny_neox_dir, dataset=str(text), out_dir=str(out), tokens=64 * 24, batch_size=64,
                           context_size=32, eval_rows=2, k=4, expansion_factor=1, checkpoint_every=8, progress=False,
                           layers="1", **kw)

    run.train(cfg(tmp_path / "ref"))
    fault = WriteFault(monkeypatch, "manifest", nth=2)
    with pytest.raises(OSError):
        run.train(cfg(tmp_path / "cut"))
    assert fault.failed and latest_checkpoint(tmp_path / "cut").name == "step_00000008"
    lines: list[str] = []
    run.train(cfg(tmp_path / "cut", resume=True), log=lines.append)
    assert any("resume: passing over 8 streamed batches" in line for line in lines), lines
    told = [re.match(r"resume at batch 8: (\d+) of the (\d+) chunks", line) for line in lines]
    assert [m.group(1) == m.group(2) for m in told if m] == [True]  # the 64k buffer still holds all of them
    a, b = SAE.load(tmp_path / "ref" / "L1.z"), SAE.load(tmp_path / "cut" / "L1.z")
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name]), name
