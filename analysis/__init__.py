"""Analysis of attention-output SAEs (Kissane et al. 2024, "Interpreting Attention Layer Outputs with Sparse
Autoencoders"): which heads write a feature, from which source tokens, on which texts it fires, what it does to
the logits, which features each head computes, which are induction features, which matter for a circuit.

Modules: :mod:`.heads` (weight-based head attribution, head survey), :mod:`.dfa` (direct feature attribution by
head and source position), :mod:`.rdfa` (recursive DFA), :mod:`.qk` (why a head attends where it does: exact QK
attribution to upstream parts and SAE features), :mod:`.features` (streamed feature statistics, logit effects),
:mod:`.induction` (induction heads and features, prefix-length study), :mod:`.circuits` (splicing with the error
term, ablation, noising, attribution), :mod:`.copying` and :mod:`.ioi` (tasks), :mod:`.patching` (per-head activation and path patching),
:mod:`.ioi_heads` (per-head IOI scores: direct logit attribution, attention), :mod:`.feature_circuit` (do an SAE's
features carry a circuit's signal: top vs random features, attribution vs patching), :mod:`.dashboard` (HTML
pages; figures, index and the default feature choice in :mod:`.dashboard_figures`, :mod:`.dashboard_index`,
:mod:`.dashboard_select`).
"""

from .circuits import (
    ablate_features,
    attribute_features,
    edit_rows,
    feature_means,
    patch_features,
    run_spliced,
    sae_spliced,
    top_features,
)
from .copying import CopyDataset, copy_logit_diff, repeated_name_prompts, spearman
from .dashboard import DashboardConfig, default_features, feature_page, write_dashboards
from .dfa import DFAResult, SourceDFA, dfa, dfa_by_source, head_fractions
from .feature_circuit import FeatureCircuitCheck, feature_circuit_check
from .features import Example, FeatureStats, StatsConfig, feature_stats, format_example
from .heads import HeadReport, format_head_report, head_report, head_shares
from .induction import (
    classify_prefix_heads,
    feature_induction_scores,
    head_induction_scores,
    induction_attribution,
    induction_feature_report,
    induction_features,
    prefix_length_study,
    repeated_tokens,
)
from .ioi import IOIDataset, corrupt_ioi, logit_diff, make_ioi, single_token_names
from .ioi_heads import IOIFeatureSources, IOIHeadScores, ioi_feature_sources, ioi_head_scores
from .logits import LogitEffects, logit_effects, logit_weights
from .patching import HeadPatching, PathPatching, head_patching, path_patching, top_heads
from .qk import QKAttribution, qk_attribution
from .rdfa import RDFAStep, rdfa, rdfa_upstream_features, rdfa_upstream_heads, residual_components, top_terms

__all__ = [
    "FeatureCircuitCheck",
    "HeadPatching",
    "IOIFeatureSources",
    "IOIHeadScores",
    "PathPatching",
    "feature_circuit_check",
    "head_patching",
    "ioi_feature_sources",
    "ioi_head_scores",
    "path_patching",
    "top_heads",
    "spearman",
    "repeated_name_prompts",
    "edit_rows",
    "copy_logit_diff",
    "CopyDataset",
    "DFAResult",
    "DashboardConfig",
    "Example",
    "FeatureStats",
    "HeadReport",
    "IOIDataset",
    "LogitEffects",
    "QKAttribution",
    "RDFAStep",
    "SourceDFA",
    "StatsConfig",
    "ablate_features",
    "attribute_features",
    "classify_prefix_heads",
    "corrupt_ioi",
    "default_features",
    "dfa",
    "dfa_by_source",
    "feature_induction_scores",
    "feature_means",
    "feature_page",
    "feature_stats",
    "format_example",
    "format_head_report",
    "head_fractions",
    "head_induction_scores",
    "head_report",
    "head_shares",
    "induction_attribution",
    "induction_feature_report",
    "induction_features",
    "logit_diff",
    "logit_effects",
    "logit_weights",
    "make_ioi",
    "patch_features",
    "prefix_length_study",
    "qk_attribution",
    "rdfa",
    "rdfa_upstream_features",
    "rdfa_upstream_heads",
    "repeated_tokens",
    "residual_components",
    "run_spliced",
    "sae_spliced",
    "single_token_names",
    "top_features",
    "top_terms",
    "write_dashboards",
]
