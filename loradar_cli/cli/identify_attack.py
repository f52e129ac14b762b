"""`loradar identify-attack`: which attack family each input came from; `loradar fit-identifier` learns the calibrated
identifier it can use."""

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from loradar_cli.cli._combine import (
    AdvSetsOpt,
    BaseOpt,
    OptDataOpt,
    OutOpt,
    SplitOpt,
    check_plot_available,
)
from loradar_cli.cli._common import (
    BatchOpt,
    JsonOpt,
    LimitOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    StoreOpt,
    console,
    open_store,
    read_names,
    run_command,
)
from loradar_cli.cli._engine_options import DeviceOpt, engine_from
from loradar_cli.cli._options import positive
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import confusion_table, pct, per_class_table, sets_table
from loradar_cli.ops.identify_modes import DEFAULT_MARGINS, modes_help

CleanOpt = Annotated[
    str,
    typer.Option("--clean", help="The 'clean' member: base (the base model), none, or an adapter name (rule mode)."),
]


@run_command
def identify_cli(
    adapters: Annotated[
        list[str] | None,
        typer.Argument(
            help="Attack-specific adapters ('-' reads stdin); calibrated mode defaults to the identifier's."
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help=f"{modes_help()}. Default: calibrated with --identifier, else relative-rule.",
        ),
    ] = None,
    identifier: Annotated[str | None, typer.Option("--identifier", help="Fitted identifier (calibrated mode).")] = None,
    margin: Annotated[
        float | None,
        typer.Option(
            "--margin",
            min=0.0,
            help="Rule modes: lead over the runner-up needed to name an attack, else 'unknown' "
            f"(default {DEFAULT_MARGINS}: probability units for rule, clean standard deviations for relative-rule).",
        ),
    ] = None,
    clean: CleanOpt = "base",
    base: BaseOpt = None,
    data: OptDataOpt = None,
    split: SplitOpt = "test",
    adv_set: AdvSetsOpt = None,
    limit: LimitOpt = None,
    out: OutOpt = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the confusion matrix to FILE.png (needs matplotlib).")
    ] = None,
    reject: Annotated[
        bool, typer.Option("--reject/--no-reject", help="calibrated: answer 'unknown' far from the fitted classes.")
    ] = True,
    batch_size: BatchOpt = 256,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Identify the attack family of each input from the adapters' outputs (with --identifier: a classifier fitted by
    `loradar fit-identifier`); with labelled sets, report accuracy and the confusion matrix."""
    from loradar_cli.device import using
    from loradar_cli.jobs.identify import identify_sets

    check_plot_available(plot)
    names = read_names(adapters) if adapters else []
    with using(engine_from(device)) as engine:
        report = identify_sets(
            open_store(store),
            names,
            base=base,
            mode=mode,
            identifier=identifier,
            margin=margin,
            clean=clean,
            data=data,
            split=split,
            adv_sets=adv_set or [],
            limit=limit,
            seed=seed,
            batch_size=batch_size,
            out=out,
            reject=reject,
        )
    result = report.model_dump(mode="json")
    confusion = result["confusion"]
    if plot is not None and confusion:
        written = plot_confusion(plot, confusion, f"attack identification ({report.mode})")
        console.print(f"confusion matrix plot: {written}", highlight=False)

    def human() -> None:
        console.print(sets_table(result))
        if confusion:
            console.print(confusion_table(confusion, f"confusion matrix, accuracy {pct(report.accuracy)} %"))
            console.print(per_class_table(result["per_class"]))

    show_result(json_out, {**result, "run": engine.describe()}, quiet=quiet, human=human)


def _list_features(value: bool) -> None:
    """--list-features: the feature groups an identifier can be fitted on, one per line (name, reads, summary)."""
    if value:
        from loradar_cli.ops.identify_features import IDENTIFY_FEATURES

        for name in IDENTIFY_FEATURES.names():
            group = IDENTIFY_FEATURES.get(name)
            print(f"{name}\t{'input' if group.needs_input else 'members'}\t{group.doc}")
        raise typer.Exit()


@run_command
def fit_identifier_cli(
    adapters: Annotated[list[str], typer.Argument(help="Attack-specific adapters ('-' reads stdin).")],
    name: Annotated[str, typer.Option("--name", help="Name of the identifier (stored under identifiers/).")],
    adv_set: AdvSetsOpt = None,
    data: Annotated[str | None, typer.Option("--data", help="Clean training inputs (labelled 'clean').")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of --data.")] = "val",
    clean: Annotated[
        str, typer.Option("--clean", help="base: add the base model's outputs as features; none.")
    ] = "base",
    features: Annotated[
        str,
        typer.Option(
            "--features",
            help="auto (greedy selection of feature groups by cross-validated accuracy) or a comma list of groups; "
            "--list-features lists them.",
        ),
    ] = "auto",
    held_out: Annotated[
        float, typer.Option("--held-out", min=0.05, max=0.9, help="Fraction of each class held out to score the fit.")
    ] = 0.25,
    reject_quantile: Annotated[
        float,
        typer.Option(
            "--reject-quantile",
            min=0.0,
            max=1.0,
            help="Answer 'unknown' beyond this quantile of held-out distance / confidence (about 2(1-q) of fitted "
            "inputs rejected); 1 disables rejection.",
        ),
    ] = 0.99,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Full-batch optimiser steps.")] = 300,
    lr: Annotated[float, typer.Option("--lr", callback=positive)] = 0.05,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 1e-3,
    balance: Annotated[
        bool,
        typer.Option(
            "--balance",
            help="Weigh every class the same in the loss and in the feature selection's score, whatever its count "
            "(e.g. clean data next to several sets per attack).",
        ),
    ] = False,
    base: BaseOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 256,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    list_features: Annotated[
        bool,
        typer.Option(
            "--list-features", callback=_list_features, is_eager=True, help="List the feature groups and exit."
        ),
    ] = False,
) -> None:
    """Fit the calibrated identifier on sets labelled by attack (and clean data), score it on a held-out part, store it."""
    from loradar_cli.device import using
    from loradar_cli.jobs.fit_identifier import fit_identifier_from_sets

    with using(engine_from(device)) as engine:
        _, report = fit_identifier_from_sets(
            open_store(store),
            read_names(adapters),
            name=name,
            adv_sets=adv_set or [],
            base=base,
            data=data,
            split=split,
            limit=limit,
            clean=clean,
            features=[f.strip() for f in features.split(",") if f.strip()],
            held_out=held_out,
            reject_quantile=reject_quantile if reject_quantile < 1 else None,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            balance=balance,
            seed=seed,
            batch_size=batch_size,
            overwrite=overwrite,
        )

    result = report.model_dump(mode="json")

    def human() -> None:
        held = result["held_out"]
        console.print(
            f"features: {', '.join(report.features)}\n"
            f"training accuracy (inputs it was fitted on, n={report.training['n_fit']}): "
            f"{pct(report.train_accuracy)} %\n"
            f"held-out accuracy (n={held['n']}, not fitted on): {pct(report.held_out_accuracy)} %, "
            f"{pct(held['accuracy'])} % with rejection ({pct(held['unknown_rate'])} % unknown)",
            highlight=False,
        )
        console.print(confusion_table(held["confusion"], "held-out confusion matrix (with rejection)"))
        console.print(per_class_table(held["per_class"], "held-out per-class scores"))

    show_result(json_out, {**result, "run": engine.describe()}, quiet=quiet, human=human, result=name)


def plot_confusion(path: Path, confusion: Mapping[str, Any], title: str) -> Path:
    """Draw the (rows × columns) confusion matrix with counts to an image (matplotlib, headless backend)."""
    import matplotlib

    from loradar_cli.files import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns, matrix = confusion["rows"], confusion["columns"], confusion["matrix"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(columns), 1.0 + 0.8 * len(rows)))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the temporary name has no suffix: the format comes from the target's
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
