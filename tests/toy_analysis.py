"""A toy analysis, as a user adds one: one function and one registration (``tests/test_analysis_registry.py``)."""

from sae_lens_attn.activations import harvest
from sae_lens_attn.analysis.registry import Analysis, Context, Option, Part, register


def densest_features(ctx: Context):
    """The ``--n`` features that fire on the most tokens of the rows."""
    h = harvest(ctx.model, ctx.rows, [ctx.site])
    x = h.acts[ctx.site][h.mask].to(ctx.sae.dtype)
    fires = (ctx.sae.encode(x) > 0).sum(0)
    top = fires.topk(ctx.args.n).indices.tolist()
    yield Part(f"densest features: {top}", {"densest": top, "n_tokens": int(x.shape[0])})


TOY = register(Analysis("toy-densest", densest_features, help="the features firing most often (a toy)",
                        options=(Option("--n", int, 3, "features listed"),), explorer=True))
