"""The job behind `loradar attack`: craft a labelled adversarial set against a stored model and save it."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loradar_cli.advset import AdvSet, save_adv_set
from loradar_cli.attacks import build_attack
from loradar_cli.loading import load_model, model_data
from loradar_cli.metrics import Progress, accuracy
from loradar_cli.recipes.loop import adversarial
from loradar_cli.store.store import Store


def craft_adv_set(
    store: Store,
    out: Path,
    *,
    base: str,
    attack: str,
    data: str,
    adapter: str | None = None,
    attack_options: Mapping[str, Any] | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    progress: Progress | None = None,
) -> tuple[AdvSet, float]:
    """Attack the test split against base (+ adapter) and save the set; returns it and the target's accuracy on it."""
    model = load_model(store, base, adapter)
    stored_meta = store.base_meta(base)
    attack_fn = build_attack(attack, **dict(attack_options or {}))
    clean = model_data(data, split, stored_meta, seed=seed, limit=limit)
    torch.manual_seed(seed)
    x_adv = adversarial(attack_fn, model, clean.x, clean.y, batch_size)
    acc = accuracy(model, x_adv, clean.y)
    info = {
        "config": attack_fn.describe(),
        "target": {"base": base, "adapter": adapter, "base_fingerprint": stored_meta.fingerprint},
        "data": data,
        "split": split,
        "limit": limit,
        "seed": seed,
        "target_accuracy": acc,
    }
    adv = AdvSet(x_adv, clean.y, attack, info)
    save_adv_set(out, adv)
    return adv, acc
