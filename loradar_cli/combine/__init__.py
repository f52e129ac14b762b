"""Old import path of the store-level merge/trim/vote/identify jobs (kept one release).

Use `loradar_cli.jobs.<command>` (merge, trim, ensemble_vote, identify, fit_identifier), `loradar_cli.identifier`
and `loradar_cli.members` instead. The old submodules (`loradar_cli.combine.merge`, ...) are aliases of the new ones,
so their objects are the same; `combine.identify`, since split in three, is a module of the same objects. The tensor
helpers of `combine.factors` are in `loradar_cli.lora.state`.
"""

import sys
from types import ModuleType

from loradar_cli import identifier, members
from loradar_cli.identifier import Identifier, IdentifierMeta, load_identifier
from loradar_cli.jobs import ensemble_vote, fit_identifier, merge, trim
from loradar_cli.jobs import identify as identify_job
from loradar_cli.jobs.ensemble_vote import (
    ENSEMBLE_METHODS,
    Ensemble,
    EnsembleClassifier,
    MeanLogits,
    load_ensemble,
    route_choice,
    vote_sets,
)
from loradar_cli.jobs.fit_identifier import fit_identifier_from_sets
from loradar_cli.jobs.identify import IDENTIFY_MODES, identify_sets
from loradar_cli.jobs.merge import MERGE_METHODS, TTSOptions, merge_adapters
from loradar_cli.jobs.trim import trim_adapter
from loradar_cli.members import (
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


def _joined(name: str, *parts: ModuleType) -> ModuleType:
    """A module holding every public name of `parts` (the same objects), for an old path whose module was split."""
    module = ModuleType(name, parts[0].__doc__)
    for part in parts:
        module.__dict__.update({k: v for k, v in vars(part).items() if not k.startswith("__")})
    return module


ensemble = ensemble_vote
identify = _joined(f"{__name__}.identify", identify_job, fit_identifier, identifier)
for _old, _new in {"merge": merge, "trim": trim, "ensemble": ensemble_vote, "identify": identify}.items():
    sys.modules[f"{__name__}.{_old}"] = _new
sys.modules[f"{__name__}.members"] = members

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
