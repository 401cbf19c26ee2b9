"""On-disk activation cache: exact round trip, extend/resume, damage detection, shuffling, full disk."""

from __future__ import annotations

import errno
import itertools
import json

import pytest
import torch

import sae_lens_attn.cache_write as cache_write
from sae_lens_attn.activations import harvest_all
from sae_lens_attn.cache import (
    CachedActivations,
    CacheError,
    CacheWriteError,
    read_manifest,
    write_cache,
)
from sae_lens_attn.models import bos_token_id, model_name
from sae_lens_attn.sites import Site
from tests.faults import WriteFault

SITES = [Site(0), Site(1, "attn_out"), Site(1, head=2)]
N_ROWS, CTX = 24, 16
SHARD = 50  # vectors per shard: ~3 rows of 15 kept tokens, so a 24-row cache has ~8 shards


def _rows(model, n=N_ROWS, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, model.cfg.d_vocab, (n, CTX), generator=g)
    bos = bos_token_id(model)
    rows[:, 0] = bos
    rows[3, 7] = rows[11, 2] = bos  # BOS inside rows too: dropped, so rows hold different token counts
    return rows


def _write(model, rows, path, **kw):
    kw.setdefault("shard_tokens", SHARD)
    kw.setdefault("model_batch_rows", 10)  # model chunks straddle shard boundaries (shards hold ~3 rows)
    return write_cache(model, rows, SITES, path, **kw)


def _assert_same(a: CachedActivations, b: CachedActivations):
    da, db = a.load_all(), b.load_all()
    assert set(da) == set(db)
    for s in da:
        assert torch.equal(da[s].acts, db[s].acts), s
        assert (da[s].grads is None) == (db[s].grads is None)
        if da[s].grads is not None:
            assert torch.equal(da[s].grads, db[s].grads), s
    for x, y in zip(a.load_index(), b.load_index()):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def rows(tiny_neox):
    return _rows(tiny_neox)


@pytest.fixture(scope="module")
def full_cache(tiny_neox, rows, tmp_path_factory):
    """An uninterrupted write of all rows, with gradients."""
    path = tmp_path_factory.mktemp("full")
    _write(tiny_neox, rows, path, with_grad=True)
    return path


@pytest.mark.parametrize("with_grad", [False, True])
def test_round_trip_is_bit_exact_and_manifest_complete(tiny_neox, rows, full_cache, tmp_path, with_grad):
    if with_grad:
        tmp_path = full_cache
        man = read_manifest(full_cache)
    else:
        man = _write(tiny_neox, rows, tmp_path, with_grad=with_grad)
    ref = harvest_all(tiny_neox, rows, SITES, with_grad=with_grad)
    cache = CachedActivations(tmp_path)
    got = cache.load_all()
    mask = rows != bos_token_id(tiny_neox)
    n = int(mask.sum())
    assert n == N_ROWS * CTX - N_ROWS - 2 and cache.n_tokens == len(cache) == n
    for s in SITES:
        assert got[s].acts.shape == (n, s.d_in(tiny_neox.cfg))
        assert torch.equal(got[s].acts, ref[s].acts), s
        if with_grad:
            assert torch.equal(got[s].grads, ref[s].grads), s
        else:
            assert got[s].grads is None
    # every vector maps back to its token: (row, pos) in row-major order, token ids as in the rows
    idx = cache.load_index()
    r, p = mask.nonzero(as_tuple=True)
    assert torch.equal(idx.row, r) and torch.equal(idx.pos, p.to(idx.pos.dtype))
    assert torch.equal(idx.token_ids.long(), rows[r, p])

    # manifest: settings, and shards of whole rows, contiguous, none over the limit (rows hold <= 15 tokens)
    disk = json.loads((tmp_path / "manifest.json").read_text())
    assert disk["format_version"] == 1 and disk["model_name"] == model_name(tiny_neox)
    assert disk["model_cfg"] == {"n_layers": 2, "n_heads": 4, "d_head": 8, "d_model": 32}
    assert [s["label"] for s in disk["sites"]] == ["L0.z", "L1.attn_out", "L1.z.h2"]
    assert [s["hook_name"] for s in disk["sites"]] == [s.hook_name for s in SITES]
    assert [s["d_in"] for s in disk["sites"]] == [32, 32, 8]
    assert disk["dtype"] == "float32" and disk["with_grad"] is with_grad and disk["drop_bos"] is True
    assert disk["context_size"] == CTX and disk["rows_done"] == N_ROWS and disk["n_tokens"] == n
    shards = man.shards
    assert len(shards) >= 7 and [s.file for s in shards] == [
        f"shard_{i:05d}.safetensors" for i in range(len(shards))
    ]
    assert shards[0].row_start == 0 and shards[-1].row_end == N_ROWS
    assert all(a.row_end == b.row_start for a, b in zip(shards, shards[1:]))
    assert all(0 < s.n_tokens <= SHARD for s in shards) and sum(s.n_tokens for s in shards) == n
    for s in shards:
        assert s.n_tokens == int(mask[s.row_start : s.row_end].sum())
        assert s.size == (tmp_path / s.file).stat().st_size and len(s.sha256) == 64
    # shard-by-shard reading agrees with load_all
    pieces = list(cache.iter_shards())
    assert torch.equal(torch.cat([p.data[SITES[0]].acts for p in pieces]), got[SITES[0]].acts)
    assert all(p.index.row.min() >= p.info.row_start and p.index.row.max() < p.info.row_end for p in pieces)


def test_site_selection(full_cache):
    one = CachedActivations(full_cache, sites=["L1.attn_out"])
    assert one.sites == [Site(1, "attn_out")]
    full = CachedActivations(full_cache, verify=False).load_all()
    got = one.load_all()
    assert list(got) == [Site(1, "attn_out")]
    assert torch.equal(got[Site(1, "attn_out")].acts, full[Site(1, "attn_out")].acts)
    assert torch.equal(got[Site(1, "attn_out")].grads, full[Site(1, "attn_out")].grads)
    with pytest.raises(CacheError, match=r"site L0\.attn_out is not in the cache"):
        CachedActivations(full_cache, sites=[Site(0, "attn_out")])


def test_extend_equals_one_write(tiny_neox, rows, full_cache, tmp_path):
    m1 = _write(tiny_neox, rows[:10], tmp_path, with_grad=True)
    assert m1.rows_done == 10 and read_manifest(tmp_path).rows_done == 10
    m2 = _write(tiny_neox, rows, tmp_path, with_grad=True)
    assert m2.rows_done == N_ROWS and read_manifest(tmp_path).rows_done == N_ROWS
    assert m2.shards[: len(m1.shards)] == m1.shards  # old shards untouched, new ones appended
    assert any(s.row_start == 10 for s in m2.shards)
    _assert_same(CachedActivations(tmp_path), CachedActivations(full_cache))
    # again with the same rows: nothing to do
    files = sorted(p.name for p in tmp_path.iterdir())
    assert _write(tiny_neox, rows, tmp_path, with_grad=True).shards == m2.shards
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    # other rows, or fewer rows than cached: refused, not mixed in
    other = rows.clone()
    other[12, 5] += 1
    with pytest.raises(CacheError, match=r"rows \d+\.\.\d+ passed differ from those cached in shard_000\d\d"):
        _write(tiny_neox, torch.cat([other, rows[:2]]), tmp_path, with_grad=True)
    with pytest.raises(CacheError, match="already holds 24 rows but only 10"):
        _write(tiny_neox, rows[:10], tmp_path, with_grad=True)


def test_resume_after_crash_equals_uninterrupted(tiny_neox, rows, full_cache, tmp_path, monkeypatch):
    WriteFault(monkeypatch, ".shard_", at_byte=100, nth=3, exc=lambda: KeyboardInterrupt("simulated kill mid-shard"))
    with pytest.raises(KeyboardInterrupt):
        _write(tiny_neox, rows, tmp_path, with_grad=True)
    monkeypatch.undo()
    man = read_manifest(tmp_path)
    assert len(man.shards) == 2 and man.rows_done == man.shards[1].row_end
    assert not list(tmp_path.glob(".*.tmp"))  # an exception still cleans its own temp file
    # a hard kill would leave debris: a half-written temp file, and a renamed shard the manifest never listed
    (tmp_path / ".shard_00002.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 1000)
    (tmp_path / ".manifest.json.x.tmp").write_text("{")
    (tmp_path / "shard_00002.safetensors").write_bytes(b"partial garbage")
    part = CachedActivations(tmp_path)  # the committed part is a valid cache on its own
    assert part.n_tokens == sum(s.n_tokens for s in man.shards)

    _write(tiny_neox, rows, tmp_path, with_grad=True)
    assert not list(tmp_path.glob(".*.tmp"))
    resumed = CachedActivations(tmp_path)
    assert read_manifest(tmp_path).rows_done == N_ROWS
    _assert_same(resumed, CachedActivations(full_cache))


def test_truncated_corrupted_missing_and_foreign_shards(tiny_neox, rows, tmp_path):
    _write(tiny_neox, rows[:12], tmp_path)
    shard = tmp_path / "shard_00001.safetensors"
    good = shard.read_bytes()

    shard.write_bytes(good[:-100])
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"shard_00001\.safetensors is truncated: \d+ bytes on disk"):
            CachedActivations(tmp_path, verify=verify)

    bad = bytearray(good)
    bad[-5] ^= 0xFF  # same size, one flipped byte in the data
    shard.write_bytes(bytes(bad))
    with pytest.raises(CacheError, match=r"shard_00001\.safetensors is corrupted: sha256"):
        CachedActivations(tmp_path)
    CachedActivations(tmp_path, verify=False)  # size-only check: the caller opted out of hashing

    shard.write_bytes(good)
    CachedActivations(tmp_path)
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard_00001\.safetensors is missing"):
        CachedActivations(tmp_path, verify=False)
    shard.write_bytes(good)

    # a shard file from elsewhere whose size and hash were (mis)recorded: the header check catches it
    man = json.loads((tmp_path / "manifest.json").read_text())
    foreign = (tmp_path / "shard_00000.safetensors").read_bytes()
    shard.write_bytes(foreign)
    man["shards"][1].update(size=len(foreign), sha256=man["shards"][0]["sha256"])
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(
        CacheError, match=r"shard_00001\.safetensors: (tensor .* the manifest needs|header says)"
    ):
        CachedActivations(tmp_path)

    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="manifest.json is missing"):
        CachedActivations(tmp_path)


def test_extending_with_other_settings_names_the_field(tiny_neox, rows, tmp_path):
    _write(tiny_neox, rows[:4], tmp_path)
    with pytest.raises(CacheError, match=r"with_grad: cache has False, this call has True") as e:
        _write(tiny_neox, rows, tmp_path, with_grad=True)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(
        CacheError, match=r"sites: cache has \['L0\.z', 'L1\.attn_out', 'L1\.z\.h2'\], this call has"
    ):
        write_cache(tiny_neox, rows, [Site(0)], tmp_path, shard_tokens=SHARD)
    with pytest.raises(CacheError, match=r"drop_bos"):
        _write(tiny_neox, rows, tmp_path, drop_bos=False)
    with pytest.raises(CacheError, match=r"context_size: cache has 16, this call has 8"):
        _write(tiny_neox, rows[:, :8], tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    man.update(dtype="bfloat16", model_name="someone/else")
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(
        CacheError, match=r"model_name: cache has 'someone/else'.*dtype: cache has 'bfloat16'"
    ):
        _write(tiny_neox, rows, tmp_path)
    # the site order may differ: the cache keeps its own
    man.update(dtype="float32", model_name=model_name(tiny_neox))
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    write_cache(tiny_neox, rows[:8], SITES[::-1], tmp_path, shard_tokens=SHARD)
    assert read_manifest(tmp_path).rows_done == 8


def test_one_writer_at_a_time(tiny_neox, rows, tmp_path):
    with cache_write._write_lock(tmp_path):
        with pytest.raises(CacheError, match="another write_cache is writing"):
            _write(tiny_neox, rows, tmp_path)


def test_shuffled_batches_cover_each_vector_once_per_epoch(full_cache):
    cache = CachedActivations(full_cache)
    n, bs = cache.n_tokens, 16
    ref = cache.load_all()
    idx = cache.load_index()
    where = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(idx.row, idx.pos))}
    assert len(where) == n and n % bs != 0  # so batches straddle window and epoch boundaries

    def stream(seed, epochs=2, **kw):
        out = list(cache.indexed_batches(bs, seed=seed, epochs=epochs, window_shards=2, **kw))
        ids = []
        for data, index in out:
            assert list(data) == cache.sites
            got = torch.tensor([where[(int(r), int(p))] for r, p in zip(index.row, index.pos)])
            assert torch.equal(index.token_ids, idx.token_ids[got])
            for s in cache.sites:  # same tokens, same order, at every site; grads ride with their acts
                assert torch.equal(data[s].acts, ref[s].acts[got]), s
                assert torch.equal(data[s].grads, ref[s].grads[got]), s
            ids.extend(got.tolist())
        return [d for d, _ in out], ids

    out, ids = stream(0)
    assert [len(b[cache.sites[0]].acts) for b in out[:-1]] == [bs] * (len(out) - 1)
    assert len(out[-1][cache.sites[0]].acts) == 2 * n % bs
    assert len(ids) == 2 * n
    assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
    assert ids[:n] != ids[n:]  # a new permutation each epoch
    # a batch mixes rows from its window's shards, not one shard's rows in order
    assert len({int(r) for r in idx.row[ids[:bs]]}) > 3

    # batches() serves exactly what indexed_batches() does, reproducibly; another seed, another order
    plain = list(cache.batches(bs, seed=0, epochs=2, window_shards=2))
    assert len(plain) == len(out)
    assert all(
        torch.equal(p[s].acts, o[s].acts) and torch.equal(p[s].grads, o[s].grads)
        for p, o in zip(plain, out)
        for s in cache.sites
    )
    assert stream(0)[1] == ids
    other = stream(1)[1]
    assert other != ids and sorted(other[:n]) == list(range(n))

    dropped = list(cache.batches(bs, seed=0, epochs=2, window_shards=2, drop_last=True))
    assert len(dropped) == 2 * n // bs and all(len(b[cache.sites[0]].acts) == bs for b in dropped)
    endless = list(itertools.islice(cache.batches(bs, seed=3, window_shards=100), 3 * n // bs))
    assert all(len(b[cache.sites[0]].acts) == bs for b in endless)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(cache.batches(n + 1))


def test_full_disk_removes_temp_and_keeps_manifest(tiny_neox, rows, full_cache, tmp_path, monkeypatch):
    seen = {}
    # the disk fills up 4096 bytes into shard 1 (those bytes reach the temp file first)
    fault = WriteFault(monkeypatch, ".shard_00001", at_byte=4096,
                       before_fail=lambda: seen.update(manifest=(tmp_path / "manifest.json").read_bytes()))
    with pytest.raises(CacheWriteError) as e:
        _write(tiny_neox, rows, tmp_path, with_grad=True)
    assert fault.failed
    msg = str(e.value)
    assert str(tmp_path) in msg and "ENOSPC" in msg and "nothing already saved was damaged" in msg
    assert "shard_00001.safetensors" in msg and "4.0 kB written" in msg and "free there" in msg
    assert isinstance(e.value, OSError) and isinstance(e.value, CacheError) and e.value.errno == errno.ENOSPC
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "shard_00001.safetensors").exists()
    assert (tmp_path / "manifest.json").read_bytes() == seen["manifest"]
    assert CachedActivations(tmp_path).n_shards == 1

    monkeypatch.undo()  # space freed: the same call continues
    _write(tiny_neox, rows, tmp_path, with_grad=True)
    _assert_same(CachedActivations(tmp_path), CachedActivations(full_cache))


def test_full_disk_on_manifest_update_drops_the_unlisted_shard(tiny_neox, rows, tmp_path, monkeypatch):
    manifests = []
    # the third manifest write fails (new-cache manifest, shard 0 committed, then the disk fills up)
    WriteFault(monkeypatch, ".manifest.json", at_byte=10, nth=3,
               before_fail=lambda: manifests.append((tmp_path / "manifest.json").read_bytes()))
    with pytest.raises(CacheWriteError, match="manifest.json still lists the 1 complete shard"):
        _write(tiny_neox, rows[:8], tmp_path)
    assert (tmp_path / "manifest.json").read_bytes() == manifests[-1]
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == ["shard_00000.safetensors"]
    assert CachedActivations(tmp_path).n_shards == 1
