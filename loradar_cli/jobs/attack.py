"""The job behind `loradar attack`: craft a labelled adversarial set against a stored model and save it."""

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loradar_cli.advset import AdvSet, save_adv_set
from loradar_cli.attacks import build_attack
from loradar_cli.device import Engine
from loradar_cli.distributed import batch_seed, gather_points, on_main
from loradar_cli.jobs.attack_target import EnsembleSpec, EvasionSpec, build_target, craft_against
from loradar_cli.loader import eval_batches
from loradar_cli.loading import model_source
from loradar_cli.metrics import Progress, correct, mean_flag
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
    engine: Engine | None = None,
    ensemble: EnsembleSpec | None = None,
    evade: EvasionSpec | None = None,
) -> tuple[AdvSet, float]:
    """Attack the test split against base (+ adapter) and save the set; returns it and the target's accuracy on it.

    Batch k's attack is seeded by (seed, k); under torchrun the processes split the batches, rank 0 gathers the
    examples in point order and alone writes the file, so the set equals a one-process run's. With `ensemble`
    the set is crafted against the ensemble's decision (and its accuracy is the decision's); with `evade`, by the
    adaptive attacker who also hides the attack's family from an identifier.
    """
    engine = engine or Engine()
    target = build_target(store, base, adapter=adapter, ensemble=ensemble, evade=evade, engine=engine)
    stored_meta = store.base_meta(base)
    attack_fn = build_attack(attack, **dict(attack_options or {}))
    clean = model_source(data, split, stored_meta, seed=seed, limit=limit)
    start = time.perf_counter()
    parts, flags, done = [], [], 0
    devices = [engine.device] if engine.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), engine.autocast():
        for number, first, x, y in eval_batches(clean, batch_size, engine):
            torch.manual_seed(batch_seed(seed, number))
            x_adv = craft_against(attack_fn, target, x, y)
            parts.append((first, x_adv.cpu()))
            flags.append((first, correct(target.judge, x_adv, y, batch_size).cpu()))
            done += len(y) * engine.world.size
            if progress:
                progress(f"{attack} → {out.name}", min(done, len(clean)), len(clean))
    x_all = gather_points(engine.world, parts, len(clean))
    acc = mean_flag(gather_points(engine.world, flags, len(clean)))
    info = {
        "config": attack_fn.describe(),
        "target": {"base": base, "adapter": adapter, "base_fingerprint": stored_meta.fingerprint, **target.info},
        "data": data,
        "split": split,
        "limit": limit,
        "seed": seed,
        "target_accuracy": acc,
        "run": engine.record(time.perf_counter() - start, len(clean)),
    }
    adv = AdvSet(x_all.contiguous(), clean.labels.clone(), attack, info)
    on_main(engine.world, lambda: save_adv_set(out, adv))
    return adv, acc
