"""Bad input: every invalid setting, damaged file or failing disk gives a clear error naming the field, flag
or file, and nothing already saved is damaged. Property-based where the input space is large."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_lens_attn import __version__
from sae_lens_attn.activations import NonFiniteActivationError, SiteBatch
from sae_lens_attn.files import WriteError
from sae_lens_attn.frontends.cli import parse_train_config
from sae_lens_attn.interop import load_sae
from sae_lens_attn.sae import SAE, SAEConfig, SAEFileError
from sae_lens_attn.sites import Site
from sae_lens_attn.training.config import TrainConfig
from sae_lens_attn.training.trainer import (
    CheckpointError,
    CheckpointWriteError,
    OptimConfig,
    Trainer,
    latest_checkpoint,
    load_trainer_state,
    verify_checkpoint,
)
from tests.faults import WriteFault

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------- TrainConfig values

_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-./", min_size=1, max_size=12).filter(
    lambda s: s.lower() != "none"
)
_pos = st.integers(1, 10**7)
_nonneg = st.integers(0, 10**7)
_finite_nonneg = st.floats(0, 1e3, allow_nan=False, allow_infinity=False)
_layers = st.one_of(st.just("all"), st.lists(st.integers(0, 40), min_size=1, max_size=4).map(
    lambda xs: ",".join(map(str, xs))))

VALID = {
    "model": st.one_of(st.none(), _name), "dataset": st.one_of(st.none(), _name), "text_field": _name,
    "encoding": st.sampled_from(["utf-8", "latin-1", "cp1252", "UTF-16"]), "layers": _layers, "site": st.sampled_from(["z", "attn_out"]), "head": st.none(),
    "sae": st.sampled_from(["topk", "gsae"]), "k": st.integers(1, 64), "d_sae": st.none(),
    "expansion_factor": st.integers(1, 64), "gsae_beta": _finite_nonneg, "tokens": _pos, "batch_size": _pos,
    "lr": st.floats(1e-6, 1.0), "warmup_steps": _nonneg, "decay_fraction": st.floats(0, 1),
    "auxk_alpha": _finite_nonneg, "auxk_k": st.one_of(st.none(), _pos), "dead_tokens": _pos,
    "context_size": st.integers(2, 4096), "start_token": st.sampled_from(["bos", "none", "<|endoftext|>"]),
    "model_batch_rows": _pos, "eval_rows": _nonneg, "drop_bos": st.booleans(),
    "activation_cache": st.one_of(st.none(), _name), "bf16_encoder": st.booleans(),
    "device": st.sampled_from([None, "cpu", "cuda", "cuda:1", "mps"]),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16"]), "seed": st.integers(0, 2**31 - 1),
    "out_dir": _name, "checkpoint_every": _nonneg, "log_every": _pos, "progress": st.booleans(),
    "resume": st.booleans(), "overwrite": st.booleans(), "deterministic": st.booleans(), "distributed": st.sampled_from(["auto", "off", "dp", "sites"]),
    "wandb_project": st.one_of(st.none(), _name),
}
assert set(VALID) == {f.name for f in fields(TrainConfig)}, "every TrainConfig field needs a strategy here"

_wrong_type = st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
_bad_int = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=3), st.booleans(), _wrong_type)
_bad_nonneg = st.one_of(st.integers(max_value=-1), st.text(max_size=3), st.booleans(), st.floats(), _wrong_type)
_bad_float_nonneg = st.one_of(st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf), st.text(max_size=3),
                              st.booleans(), _wrong_type)
_bad_str = st.one_of(st.just(""), st.just("   "), st.integers(), st.booleans(), _wrong_type)
_bad_choice = st.one_of(st.text(max_size=8), st.integers(), st.none())

INVALID = {
    "model": _bad_str, "dataset": _bad_str, "text_field": st.one_of(_bad_str, st.none()),
    "encoding": st.one_of(st.sampled_from(["utf-9", "klingon", ""]), st.integers(), st.none()),
    "layers": st.one_of(st.sampled_from(["", "1,", "x", "1;2", "-1", "1.5", "all,1"]), st.integers(), st.none()),
    "site": _bad_choice, "head": st.one_of(st.integers(max_value=-1), st.text(max_size=2), st.floats()),
    "sae": _bad_choice, "k": _bad_int, "d_sae": _bad_int, "expansion_factor": _bad_int,
    "gsae_beta": _bad_float_nonneg, "tokens": _bad_int, "batch_size": _bad_int,
    "lr": st.one_of(st.floats(max_value=0), st.just(math.nan), st.just(math.inf), st.text(max_size=3), st.none()),
    "warmup_steps": _bad_nonneg, "decay_fraction": st.one_of(st.floats(min_value=1.0001), st.floats(max_value=-1e-9),
                                                              st.just(math.nan), st.text(max_size=2)),
    "auxk_alpha": _bad_float_nonneg, "auxk_k": _bad_int, "dead_tokens": _bad_int,
    "context_size": st.one_of(st.integers(max_value=1), st.text(max_size=2), st.floats()),
    "start_token": st.one_of(_bad_str, st.none()), "model_batch_rows": _bad_int, "eval_rows": _bad_nonneg, "drop_bos": st.one_of(st.integers(), st.text(max_size=4), st.none()),
    "activation_cache": _bad_str, "bf16_encoder": st.one_of(st.integers(), st.text(max_size=4)),
    "device": st.one_of(st.sampled_from(["gpu", "cuda:x", "", "tpu:0:1"]), st.integers()),
    "dtype": _bad_choice, "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31), st.text(max_size=2)),
    "out_dir": st.one_of(_bad_str, st.none()), "checkpoint_every": _bad_nonneg,
    "log_every": _bad_int, "progress": st.one_of(st.integers(), st.text(max_size=4), st.none()),
    "resume": st.one_of(st.integers(), st.text(max_size=4), st.none()),
    "overwrite": st.one_of(st.integers(), st.text(max_size=4), st.none()),
    "deterministic": st.one_of(st.integers(), st.text(max_size=4), st.none()),
    "distributed": _bad_choice, "wandb_project": _bad_str,
}
assert set(INVALID) == set(VALID)


@st.composite
def valid_values(draw) -> dict:
    values = {name: draw(s) for name, s in VALID.items()}
    if values["site"] == "z":
        values["head"] = draw(st.one_of(st.none(), st.integers(0, 15)))
    values["d_sae"] = draw(st.one_of(st.none(), st.integers(values["k"], 4096)))
    values["overwrite"] = values["overwrite"] and not values["resume"]
    return values


@SETTINGS
@given(valid_values())
def test_valid_configs_construct(values):
    cfg = TrainConfig(**values)
    assert cfg.steps >= 1


@SETTINGS
@given(valid_values(), st.sampled_from(sorted(INVALID)), st.data())
def test_an_invalid_field_is_named(values, name, data):
    bad = data.draw(INVALID[name])
    with pytest.raises(ValueError, match=rf"TrainConfig\.{name}\b"):
        TrainConfig(**{**values, name: bad})


def test_cross_field_rules_are_named():
    with pytest.raises(ValueError, match=r"TrainConfig\.k \(9\) must not exceed d_sae \(8\)"):
        TrainConfig(k=9, d_sae=8)
    with pytest.raises(ValueError, match=r"TrainConfig\.head needs site 'z'"):
        TrainConfig(site="attn_out", head=0)
    with pytest.raises(ValueError, match=r"TrainConfig\.resume and TrainConfig\.overwrite exclude each other"):
        TrainConfig(resume=True, overwrite=True)


# ------------------------------------------------------------------------------------- CLI arguments


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _parse(argv: list[str]) -> tuple[TrainConfig | None, int | None, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parse_train_config(argv), None, err.getvalue()
        except SystemExit as exc:
            return None, exc.code, err.getvalue()


@SETTINGS
@given(valid_values(), st.lists(st.sampled_from(sorted(VALID)), min_size=1, max_size=8, unique=True))
def test_valid_flags_parse_to_the_same_config(values, names):
    # fields checked together travel together (d_sae >= k, head only with site z)
    names = sorted(set(names) | ({"k"} if "d_sae" in names else set()) | ({"site"} if "head" in names else set()))
    argv = [f"{_flag(n)}={_text(values[n])}" for n in names]
    cfg, code, err = _parse(argv)
    assert code is None, err
    expected = {n: values[n] for n in names}
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        got, want = getattr(cfg, f.name), expected.get(f.name, getattr(defaults, f.name))
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, f.name


CLI_INVALID = {
    int: st.sampled_from(["abc", "1.5", "", "0x", "-0.5"]),
    "positive": st.sampled_from(["0", "-3"]),
    float: st.sampled_from(["nan", "inf", "-1", "x", ""]),
    bool: st.sampled_from(["maybe", "2", "", "tru"]),
    "choice": st.text(alphabet="abcxyz_", min_size=1, max_size=6),
}
_CLI_KIND = {
    "k": "positive", "expansion_factor": "positive", "tokens": "positive", "batch_size": "positive",
    "context_size": "positive", "model_batch_rows": "positive", "dead_tokens": "positive", "log_every": "positive",
    "warmup_steps": int, "eval_rows": int, "checkpoint_every": int, "seed": int, "d_sae": "positive",
    "auxk_k": "positive", "head": int, "lr": float, "gsae_beta": float, "auxk_alpha": float,
    "decay_fraction": float, "drop_bos": bool, "bf16_encoder": bool, "progress": bool, "resume": bool,
    "deterministic": bool, "site": "choice", "sae": "choice", "dtype": "choice", "distributed": "choice",
}


@SETTINGS
@given(st.sampled_from(sorted(_CLI_KIND)), st.data())
def test_an_invalid_flag_value_exits_2_naming_the_flag(name, data):
    kind = _CLI_KIND[name]
    text = data.draw(CLI_INVALID[kind])
    if kind == "choice" and text in ("z", "attn_out", "topk", "gsae", "auto", "off", "dp", "sites"):
        return
    cfg, code, err = _parse([f"{_flag(name)}={text}"])
    if name in ("d_sae", "auxk_k", "head") and text == "":
        assert code is None and getattr(cfg, name) is None  # empty means "not set" for optional flags
        return
    assert code == 2, f"{_flag(name)}={text!r} was accepted"
    assert _flag(name) in err, err


def test_unknown_flag_is_reported():
    _, code, err = _parse(["--batchsize=3"])
    assert code == 2 and "unrecognized arguments: --batchsize=3" in err


# --------------------------------------------------------------------------------- damaged SAE files


def _saved_sae(path: Path) -> Path:
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2, metadata={"hook_name": "blocks.0.attn.hook_z"}))
    return sae.save(path, torch.full((16,), -2.0))


@pytest.mark.parametrize("loader", [SAE.load, load_sae], ids=["SAE.load", "interop.load_sae"])
def test_truncated_or_corrupted_weights_name_the_file(tmp_path, loader):
    path = _saved_sae(tmp_path / "sae")
    f = path / "sae_weights.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors.*(truncated|corrupted)"):
        loader(path)
    f.write_bytes(b"\x00\x01garbage" + data[10:])  # broken header
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors"):
        loader(path)


def test_nan_weights_are_refused_naming_the_file(tmp_path):
    path = _saved_sae(tmp_path / "sae")
    f = path / "sae_weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-8:] = b"\xff" * 8  # the last two float32s become NaN: the header still parses
    f.write_bytes(bytes(data))
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors: \w+ holds NaN/inf"):
        load_sae(path)


def test_config_from_a_newer_version_is_refused(tmp_path):
    path = _saved_sae(tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"]["sae_lens_attn_version"] = "99.0.0"
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match=rf"cfg\.json: written by sae_lens_attn 99\.0\.0, newer than this "
                                           rf"sae_lens_attn {__version__}"):
        load_sae(path)
    (path / "cfg.json").write_text('{"d_in": 8, "d_sae"')
    with pytest.raises(SAEFileError, match=r"cfg\.json: not valid JSON"):
        load_sae(path)


_json_value = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=False), st.text(max_size=6),
                        st.lists(st.integers(), max_size=2))


@SETTINGS
@given(st.dictionaries(st.sampled_from(["architecture", "d_in", "d_sae", "k", "dtype", "apply_b_dec_to_input",
                                        "normalize_activations", "reshape_activations", "metadata",
                                        "rescale_acts_by_decoder_norm", "activation_fn_str", "hook_point"]),
                       _json_value, max_size=6))
def test_any_mangled_cfg_json_loads_or_names_the_file(tmp_path_factory, mutation):
    path = _saved_sae(tmp_path_factory.mktemp("sae"))
    cfg = {**json.loads((path / "cfg.json").read_text()), **mutation}
    (path / "cfg.json").write_text(json.dumps(cfg))
    try:
        sae = load_sae(path)
    except SAEFileError as err:
        assert str(path / "cfg.json") in str(err) or "sae_weights.safetensors" in str(err), str(err)
    else:
        assert sae.cfg.d_in == 8 and sae.cfg.d_sae == 16


# ------------------------------------------------------------------------------------ checkpoints


def _stream(nan_at: int | None = None):
    g = torch.Generator().manual_seed(0)
    i = 0
    while True:
        x = torch.randn(64, 8, generator=g)
        if i == nan_at:
            x[3, 2] = math.inf
        i += 1
        yield {Site(0): SiteBatch(x, None)}


def _trainer(out: Path, steps: int = 10, every: int = 5) -> Trainer:
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k=2), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    return Trainer({Site(0): sae}, OptimConfig(lr=1e-3, steps=steps, warmup_steps=0, checkpoint_every=every), out)


def _snapshot(ckpt: Path) -> dict[str, bytes]:
    return {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}


def test_damaged_checkpoints_name_the_file(tmp_path):
    _trainer(tmp_path).fit(_stream())
    ckpt = latest_checkpoint(tmp_path)
    verify_checkpoint(ckpt)
    state = ckpt / "trainer_state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt is truncated.*delete .*step_00000010"):
        _trainer(tmp_path).restore(ckpt)
    (ckpt / "manifest.json").unlink()  # an old-style checkpoint: no manifest, the load itself must fail clearly
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: unreadable trainer state.*truncated or corrupted"):
        load_trainer_state(ckpt)
    state.write_bytes(good)
    weights = ckpt / "L0.z" / "sae_weights.safetensors"
    _trainer(tmp_path / "b").fit(_stream())
    other = latest_checkpoint(tmp_path / "b")
    w = bytearray((other / "L0.z" / "sae_weights.safetensors").read_bytes())
    w[-1] ^= 0x01  # one flipped bit in the data: safetensors cannot see it, the manifest's sha256 does
    (other / "L0.z" / "sae_weights.safetensors").write_bytes(bytes(w))
    with pytest.raises(CheckpointError, match=r"L0\.z/sae_weights\.safetensors is corrupted"):
        _trainer(tmp_path).restore(other)
    assert weights.exists()


def test_checkpoint_from_a_newer_format_is_refused(tmp_path):
    _trainer(tmp_path).fit(_stream())
    ckpt = latest_checkpoint(tmp_path)
    m = json.loads((ckpt / "manifest.json").read_text())
    m.update(format_version=99, sae_lens_attn_version="9.9.9")
    (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=rf"format_version 99 was written by sae_lens_attn 9\.9\.9; this is "
                                              rf"sae_lens_attn {__version__}.*upgrade"):
        _trainer(tmp_path).restore(ckpt)


@pytest.mark.parametrize("target,at_byte", [("trainer_state.pt", 3000), ("sae_weights.safetensors", 200),
                                            ("manifest.json", 0)])
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target, at_byte):
    """ENOSPC at a chosen byte of each file of a checkpoint (torch.save turns it into a RuntimeError, which
    must still be reported as the disk's error): one WriteError naming the file, the bytes it needed and the
    free space; the previous checkpoint stays intact and loads."""
    tr = _trainer(tmp_path, steps=20, every=5)
    stream = _stream()
    tr.cfg.steps = 10
    tr.fit(stream)
    before = latest_checkpoint(tmp_path)
    assert before.name == "step_00000010"
    snap = _snapshot(before)
    fault = WriteFault(monkeypatch, f".{target}.", at_byte=at_byte)
    tr.cfg.steps = 20
    with pytest.raises(CheckpointWriteError) as e:
        tr.fit(stream)
    assert fault.failed
    msg = str(e.value)
    assert isinstance(e.value, WriteError) and isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert re.search(rf"could not write checkpoint .*step_00000015: No space left on device \(ENOSPC; at "
                     rf".*step_00000015/(L0\.z/)?{re.escape(target)}, it needed [0-9.]+ (kB|bytes)", msg), msg
    assert re.search(r"free there\); the last complete checkpoint .*step_00000010 is intact; free space", msg), msg
    assert msg.endswith("then rerun with --resume true to continue") and "\n" not in msg
    if target == "trainer_state.pt":  # torch.save's own error names no errno: the one the write got is reported
        assert isinstance(e.value.__cause__, WriteError) and "unexpected pos" in repr(e.value.__cause__.__cause__)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == before and _snapshot(before) == snap
    assert not list((tmp_path / "checkpoints").glob(".tmp_*")) and not (tmp_path / "checkpoints" / "step_00000015").exists()
    verify_checkpoint(before)
    _trainer(tmp_path).restore(before)


def test_non_finite_activations_stop_training_and_keep_the_last_checkpoint(tmp_path):
    tr = _trainer(tmp_path, steps=20, every=5)
    with pytest.raises(NonFiniteActivationError, match=r"NaN/inf in a training batch at step 12: 1 non-finite.*"
                                                       r"last good checkpoint is .*step_00000010.*--resume"):
        tr.fit(_stream(nan_at=12))
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    verify_checkpoint(latest_checkpoint(tmp_path))
    restored = _trainer(tmp_path)
    restored.restore(latest_checkpoint(tmp_path))
    assert restored.step_idx == 10 and torch.isfinite(restored.states[Site(0)].sae.W_dec).all()
