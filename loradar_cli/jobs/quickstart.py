"""The main job on the embedded default: scikit-learn digits, a small timm base, three specialised adapters.

Needs no file and no network, and finishes in a few minutes on two CPU cores.
"""

from collections.abc import Sequence

from pydantic import BaseModel

from loradar_cli.device import Engine
from loradar_cli.evaluation import EvalRow
from loradar_cli.metrics import Progress
from loradar_cli.recipes.loop import TrainConfig
from loradar_cli.store.store import Store

QUICKSTART_ATTACKS: dict[str, dict[str, float | int]] = {
    "pgd": {"eps": 0.05, "alpha": 0.0125, "steps": 10},
    "roa": {"height": 3, "width": 3, "stride": 1, "candidates": 10, "steps": 10, "alpha": 0.1},
    "fia": {"eps": 0.05, "steps": 10, "ensemble": 8},
}


class QuickstartReport(BaseModel):
    base: str
    adapters: list[str]
    attacks: dict[str, dict[str, float | int]]
    rows: list[EvalRow]


def run_quickstart(
    store: Store,
    *,
    prefix: str = "quickstart",
    model: str = "test_resnet",
    img_size: int = 16,
    epochs: int = 4,
    base_epochs: int = 15,
    attacks: Sequence[str] = tuple(QUICKSTART_ATTACKS),
    eval_limit: int | None = 200,
    seed: int = 0,
    progress: Progress | None = None,
    engine: Engine | None = None,
) -> QuickstartReport:
    """Fit `<prefix>-base`, train `<prefix>-<attack>` adapters, and evaluate {base, adapters} × attacks."""
    from loradar_cli.jobs.evaluate import evaluate_models
    from loradar_cli.jobs.finetune import finetune_base
    from loradar_cli.jobs.train import train_and_store_adapter

    base = f"{prefix}-base"
    finetune_base(
        store,
        base,
        model=model,
        data="digits",
        epochs=base_epochs,
        lr=3e-3,
        batch_size=64,
        img_size=img_size,
        seed=seed,
        overwrite=True,
        progress=progress,
        engine=engine,
    )
    names = []
    for attack in attacks:
        name = f"{prefix}-{attack}"
        train_and_store_adapter(
            store,
            name,
            base=base,
            attack=attack,
            data="digits",
            attack_options=QUICKSTART_ATTACKS[attack],
            config=TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, seed=seed),
            r=8,
            targets="convs",
            val_limit=128,
            overwrite=True,
            progress=progress,
            engine=engine,
        )
        names.append(name)
    options = {a: QUICKSTART_ATTACKS[a] for a in attacks}
    rows = evaluate_models(
        store,
        base=base,
        adapters=[None, *names],
        data="digits",
        attacks=options,
        limit=eval_limit,
        seed=seed,
        progress=progress,
        engine=engine,
    )
    return QuickstartReport(base=base, adapters=names, attacks=options, rows=rows)
