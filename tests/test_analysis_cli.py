"""`sae-lens-attn analyze` and `sae-lens-attn dashboard` end to end on a tiny model and a saved SAE."""

import json

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.frontends.cli import main
from tests.conftest import TEXT


@pytest.fixture(scope="module")
def saved(tiny_neox_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    site = Site(1)
    sae = SAE(SAEConfig(d_in=32, d_sae=24, k=4, metadata={"hook_name": site.hook_name, "model_name": tiny_neox_dir,
                                                          "context_size": 32}), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    sae.save(root / "sae")
    text = root / "text.txt"
    text.write_text(TEXT * 4)
    return root, root / "sae", text


def test_help_lists_the_flags(capsys):
    for cmd, flags in (("analyze", ["--sae", "--tokens", "--induction-length", "--out"]),
                       ("dashboard", ["--features", "--n-features", "--plotlyjs"])):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert all(f in out for f in flags)


def test_analyze_prints_and_writes_the_report(saved, capsys):
    root, sae_dir, text = saved
    out = root / "report.json"
    # the model comes from the SAE's metadata.model_name
    rc = main(["analyze", "--sae", str(sae_dir), "--dataset", str(text), "--tokens", "256", "--top", "2",
               "--n-seq", "4", "--induction-length", "8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for section in ("Head survey", "L1H3:", "Head induction / previous-token scores", "Prefix-length study",
                    "Induction features"):
        assert section in printed
    report = json.loads(out.read_text())
    assert report["site"] == "L1.z" and report["tokens"] >= 256 - 256 // 32
    assert len(report["heads"]) == 4 and all(len(h["features"]) == 2 for h in report["heads"])
    assert len(report["head_induction"]) == 2 and len(report["head_induction"][0]) == 4
    assert report["prefix_study"]["prefix_lengths"] == [0, 1, 2, 4, 8]
    for f in report["induction_features"]:
        assert f["mass_second"] >= 0.9 and 0 <= f["head_fraction"] <= 1


def test_dashboard_writes_pages_and_index(saved, capsys):
    root, sae_dir, text = saved
    out = root / "dash"
    rc = main(["dashboard", "--sae", str(sae_dir), "--dataset", str(text), "--tokens", "256", "--n-features", "3",
               "--n-induction", "0", "--out", str(out)])
    assert rc == 0
    assert "wrote 3 feature pages" in capsys.readouterr().out
    pages = sorted(out.glob("feature_*.html"))
    assert len(pages) == 3 and (out / "index.html").exists() and (out / "plotly.min.js").exists()  # file: the default
    index = (out / "index.html").read_text()
    assert all(f'href="{p.name}"' in index for p in pages) and "<th>induction mass</th>" in index
    rc = main(["dashboard", "--sae", str(sae_dir), "--dataset", str(text), "--tokens", "64", "--features", "2,5",
               "--out", str(root / "two"), "--plotlyjs", "inline"])
    assert rc == 0 and sorted(p.name for p in (root / "two").glob("feature_*.html")) == ["feature_2.html", "feature_5.html"]
    assert not (root / "two" / "plotly.min.js").exists()


def test_dashboard_without_induction_scores_where_the_model_refuses_them(saved, monkeypatch, capsys):
    """As write_dashboards does: a model whose policy has no start token gets pages, no induction column."""
    from sae_lens_attn.analysis import dashboard_select
    from sae_lens_attn.spec import UnsupportedModelError

    def refuse(*a, **kw):
        raise UnsupportedModelError("induction scores index positions from a start token")

    monkeypatch.setattr(dashboard_select, "feature_induction_scores", refuse)
    root, sae_dir, text = saved
    out = root / "no_induction"
    rc = main(["dashboard", "--sae", str(sae_dir), "--dataset", str(text), "--tokens", "128", "--n-features", "2",
               "--out", str(out)])
    assert rc == 0 and "wrote 2 feature pages" in capsys.readouterr().out
    assert "induction mass" not in (out / "index.html").read_text()


def test_dashboard_default_choice_is_a_density_spread_plus_induction_features(saved, tiny_neox, capsys):
    from sae_lens_attn.analysis.dashboard_select import density_spread, most_induction_like
    from sae_lens_attn.analysis.features import StatsConfig, feature_stats
    from sae_lens_attn.analysis.induction import feature_induction_scores, max_repeat_length
    from sae_lens_attn.data import token_rows
    from sae_lens_attn.models import token_policy

    root, sae_dir, text = saved
    out = root / "default"
    assert main(["dashboard", "--sae", str(sae_dir), "--dataset", str(text), "--tokens", "128", "--n-features", "3",
                 "--n-induction", "2", "--out", str(out)]) == 0
    sae = SAE.load(sae_dir)
    rows = token_rows(str(text), tiny_neox.tokenizer, 32, token_policy(tiny_neox), max_rows=4)
    stats = feature_stats(tiny_neox, sae, rows, cfg=StatsConfig())
    spread = density_spread(stats, 3)
    scores = feature_induction_scores(tiny_neox, sae, length=max_repeat_length(tiny_neox))
    fired = set((stats.fire_count > 0).nonzero()[:, 0].tolist())
    ind = [f for f in most_induction_like(scores, 24, exclude=set(spread)) if f in fired][:2]
    assert sorted(int(p.stem.split("_")[1]) for p in out.glob("feature_*.html")) == sorted(spread + ind)
    assert json.loads((out / "features.json").read_text())["features"] == sorted(spread + ind)
    assert main(["dashboard", "--sae", str(sae_dir), "--dataset", str(text), "--n-features", "-1"]) == 2
    assert "--n-features must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["--sae", "/nonexistent/sae"], "is not an SAE directory"),
    (["--features", "2,99"], "feature ids must be in [0, 24)"),
    (["--features", "a,b"], "--features must be comma-separated integers"),
    (["--tokens", "0"], "--tokens must be positive"),
])
def test_errors_are_one_line(saved, capsys, args, msg):
    root, sae_dir, text = saved
    base = {"--sae": str(sae_dir), "--dataset": str(text), "--tokens": "64", "--out": str(root / "err")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    rc = main(["dashboard", *[x for kv in base.items() for x in kv]])
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sae-lens-attn: error:") and msg in last
