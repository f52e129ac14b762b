"""Resumable training: the run state after each completed epoch, in a hidden folder beside the store entry.

A checkpoint holds what the next epoch depends on: trainable parameters, optimiser and scheduler states, the
batch-order generator, the global RNG states (random starts, dropout), the states of a seeded attack's own
generators (`generator_states`), the history, the best epoch's weights and the recipe's own state. It is keyed by a fingerprint of the run's options, so a resume with different
options is refused instead of silently mixing two runs.
"""

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loradar_cli.errors import InvalidValueError
from loradar_cli.files import atomic_path

STATE_FILE = "state.pt"


def run_fingerprint(options: Sequence[Any]) -> str:
    """A stable digest of a run's options (JSON, sorted keys; non-JSON values by their str)."""
    return hashlib.sha256(json.dumps(list(options), sort_keys=True, default=str).encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    """The global CPU (and, when initialised, CUDA) RNG states."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_states(attack: Any) -> dict[str, Tensor]:
    """The states of a seeded attack's own generators by device (empty for an unseeded attack or a plain callable).

    A seeded attack draws its random starts from one generator per device, created on first use and advancing
    across calls (training batches and validation alike); a resumed run must continue those draws, not restart
    them from the seed.
    """
    generators = getattr(attack, "_generators", None)
    return {device: g.get_state() for device, g in generators.items()} if isinstance(generators, dict) else {}


def set_generator_states(attack: Any, states: dict[str, Tensor]) -> None:
    """Restore what `generator_states` returned (each generator made on its device and set, seed then state)."""
    generators = getattr(attack, "_generators", None)
    if not isinstance(generators, dict):
        return
    seed = getattr(getattr(attack, "config", None), "seed", None)
    generators.clear()
    for device, state in states.items():
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        generator.set_state(state)
        generators[device] = generator


class Checkpoint:
    """`<folder>/state.pt`, written atomically after each epoch; `clear()` once the result is stored."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def save(self, state: dict[str, Any]) -> None:
        """Replace the saved state (a crash mid-write leaves the previous epoch's state intact)."""
        with atomic_path(self.path) as tmp:
            torch.save({"fingerprint": self.fingerprint, "state": state}, tmp)

    def load(self) -> dict[str, Any] | None:
        """The saved state, None if there is none; a state written by a run with other options is refused."""
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InvalidValueError(
                f"cannot read the resume state {self.path} ({type(err).__name__})", hint="delete it to start over"
            ) from None
        if saved.get("fingerprint") != self.fingerprint:
            raise InvalidValueError(
                f"the resume state in {self.folder} was written by a run with other options",
                hint="resume with the same options, or run without --resume to start over",
            )
        return saved["state"]

    def clear(self) -> None:
        """Remove the folder (after the entry it was for has been written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
