"""Combining stored adapters: ΔW-space and test-time scored merges, trimming, ensemble votes, attack identification.

The library side of `merge`, `trim`, `ensemble-vote` and `identify-attack`: plain values in, metadata and report
dicts out, nothing printed. The maths lives in `loradar_cli.ops`; these modules load adapters, check that they fit
together, run models, and write the results to the store.
"""

from loradar_cli.combine.ensemble import (
    ENSEMBLE_METHODS,
    Ensemble,
    EnsembleClassifier,
    MeanLogits,
    load_ensemble,
    route_choice,
    vote_sets,
)
from loradar_cli.combine.identify import (
    IDENTIFY_MODES,
    Identifier,
    IdentifierMeta,
    fit_identifier_from_sets,
    identify_sets,
    load_identifier,
)
from loradar_cli.combine.members import (
    BASE_MEMBER,
    CLEAN,
    InputSet,
    Members,
    adapter_models,
    ensemble_probs,
    input_sets,
    load_members,
    member_models,
)
from loradar_cli.combine.merge import MERGE_METHODS, TTSOptions, merge_adapters
from loradar_cli.combine.trim import trim_adapter

__all__ = [
    "BASE_MEMBER",
    "CLEAN",
    "ENSEMBLE_METHODS",
    "IDENTIFY_MODES",
    "MERGE_METHODS",
    "Ensemble",
    "EnsembleClassifier",
    "Identifier",
    "IdentifierMeta",
    "InputSet",
    "MeanLogits",
    "Members",
    "TTSOptions",
    "adapter_models",
    "ensemble_probs",
    "fit_identifier_from_sets",
    "identify_sets",
    "input_sets",
    "load_ensemble",
    "load_identifier",
    "load_members",
    "member_models",
    "merge_adapters",
    "route_choice",
    "trim_adapter",
    "vote_sets",
]
