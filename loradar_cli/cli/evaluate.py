"""`loradar eval`: clean, white-box robust and saved-set accuracy, with the per-point worst case."""

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from loradar_cli import names
from loradar_cli.cli._combine import IdentifierOpt, WeightsOpt, check_plot_available, parse_weights
from loradar_cli.cli._common import (
    AlphaOpt,
    AttackOptOpt,
    BatchOpt,
    DataOpt,
    EpsOpt,
    JsonOpt,
    LimitOpt,
    QuietOpt,
    SeedOpt,
    StepsOpt,
    StoreOpt,
    attack_options,
    console,
    number,
    open_store,
    progress_bar,
    read_names,
    run_command,
)
from loradar_cli.cli._engine_options import (
    ChannelsLastOpt,
    DeviceOpt,
    EvalPrecisionOpt,
    NprocOpt,
    WorkersOpt,
    engine_from,
    launch_nproc,
)
from loradar_cli.cli._output import show_result
from loradar_cli.cli._tables import eval_table, pct
from loradar_cli.errors import InvalidValueError

STRICT_EXIT = 3  # a gate failure, like --min-robust-acc


@run_command
def eval_cli(
    base: Annotated[str | None, typer.Option("--base", help="Base model (default: the adapters' base).")] = None,
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="Adapter to evaluate ('-' reads stdin); repeatable.")
    ] = None,
    attack: Annotated[list[str] | None, typer.Option("--attack", help="White-box attack; repeatable.")] = None,
    suite: Annotated[
        str | None,
        typer.Option(
            "--suite",
            help=f"Attack suite with early stopping, after any --attack: {' | '.join(names.SUITES)} "
            "(quick = PGD + APGD-CE; standard = APGD-CE, APGD-T, Square; plus adds FAB-T, FGSM, ROA, FIA).",
        ),
    ] = None,
    norm: Annotated[str, typer.Option("--norm", help=f"Threat model of --suite: {' | '.join(names.NORMS)}.")] = "linf",
    eps_sweep: Annotated[
        str | None, typer.Option("--eps-sweep", help="Worst case at each eps, e.g. 0,1/255,2/255,4/255,8/255.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="With --eps-sweep: write accuracy-vs-eps curves (PNG).")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help=f"Exit {STRICT_EXIT} when any sanity flag is raised (after printing).")
    ] = False,
    adv_set: Annotated[list[Path] | None, typer.Option("--adv-set", help="Saved adversarial set; repeatable.")] = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="Skip the base row when adapters are given.")] = False,
    vote: Annotated[
        list[str] | None,
        typer.Option(
            "--vote", help=f"Add an ensemble row: {names.choices(names.VOTE_METHODS)} vote of --members; repeatable."
        ),
    ] = None,
    route: Annotated[bool, typer.Option("--route", help="Add an identify-then-route row over --members.")] = False,
    members: Annotated[
        list[str] | None,
        typer.Option(
            "--members",
            help="Ensemble members or pools (pool:NAME), comma-separated or repeated (default: the --adapter list). "
            "Votes are attacked through mean logits and the soft vote, route through its routed decision.",
        ),
    ] = None,
    weights: WeightsOpt = None,
    identifier: IdentifierOpt = None,
    data: DataOpt = "digits",
    split: Annotated[str, typer.Option("--split")] = "test",
    eps: EpsOpt = None,
    alpha: AlphaOpt = None,
    steps: StepsOpt = None,
    attack_opt: AttackOptOpt = None,
    device: DeviceOpt = None,
    precision: EvalPrecisionOpt = "fp32",
    channels_last: ChannelsLastOpt = False,
    workers: WorkersOpt = 0,
    nproc: NprocOpt = 1,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 128,
    seed: SeedOpt = 0,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate the base, adapters and ensembles on clean data, under attacks, and on saved adversarial sets.

    Attacks run in order with early stopping (a point is attacked only while still robust); every row carries
    sanity flags, and vote and route rows are attacked through differentiable models of their decision.
    """
    from loradar_cli.jobs.evaluate import EnsembleRows, SuiteSpec, evaluate_models
    from loradar_cli.loading import resolve_base_for
    from loradar_cli.store.pools import expand_pools

    the_store = open_store(store)
    adapters = expand_pools(the_store, read_names(adapter)) if adapter else []
    voters = expand_pools(the_store, [n.strip() for item in members or [] for n in item.split(",") if n.strip()])
    voters = voters or adapters
    methods = [*dict.fromkeys(vote or []), *(["route"] if route else [])]
    if members and not methods:
        raise InvalidValueError("--members needs --vote METHOD or --route")
    ensemble = EnsembleRows(voters, methods, parse_weights(weights), identifier) if methods else None
    if ensemble is not None and not voters:
        raise InvalidValueError("ensemble rows need --members (or --adapter) names")
    sweep = parse_sweep(eps_sweep)
    check_suite_options(suite, norm, sweep, plot, bool(attack))
    check_plot_available(plot)
    base_name = resolve_base_for(the_store, adapters or voters, base)
    names = list(dict.fromkeys(attack or []))
    suite_opts, attack_opts = split_suite_options(suite, norm, attack_opt or [])
    shared = (eps, alpha, steps) if names or suite is None else (None, alpha, None)  # --eps/--steps go to the suite
    options = attack_options(names, *shared, attack_opts)
    spec = suite_spec(suite, norm, eps, steps, suite_opts, SuiteSpec)
    rows_for = ([] if no_base and (adapters or ensemble) else [None]) + adapters
    launch_nproc(nproc)
    engine = engine_from(device, precision, channels_last, workers)
    main = engine.world.is_main
    start = time.perf_counter()
    with progress_bar(not quiet and main) as progress:
        rows = evaluate_models(
            the_store,
            base=base_name,
            adapters=rows_for,
            data=data,
            attacks=options,
            suite=spec,
            adv_sets=adv_set or [],
            split=split,
            limit=limit,
            seed=seed,
            batch_size=batch_size,
            ensemble=ensemble,
            eps_sweep=sweep,
            progress=progress,
            engine=engine,
        )
    if not main:
        return
    run = engine.record(time.perf_counter() - start, rows[0].n * len(rows))
    written = plot_sweep(plot, rows, f"{data} {split}, n={rows[0].n}") if plot and sweep else None
    report = {
        "base": base_name,
        "data": data,
        "split": split,
        "limit": limit,
        "seed": seed,
        "suite": suite,
        "norm": norm if suite else None,
        "attacks": options,
        "members": voters if ensemble else None,
        "plot": str(written) if written else None,
        "rows": [r.model_dump() for r in rows],
        "run": run,
    }
    title = f"accuracy (%) on {data} {split}, n={rows[0].n}"
    show_result(json_out, report, quiet=quiet, human=lambda: console.print(eval_table(rows, title=title)))
    if not quiet:  # sanity flags warn on stderr with --json too
        print_flags(rows)
    if written is not None:
        console.print(f"wrote {written}", highlight=False)
    if strict and any(r.flags for r in rows):
        raise typer.Exit(STRICT_EXIT)


def parse_sweep(text: str | None) -> list[float]:
    """'0,1/255,2/255' -> increasing non-negative floats; malformed lists are refused in one line."""
    if text is None:
        return []
    try:
        values = [number(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidValueError(
            f"--eps-sweep expects comma-separated numbers such as 0,1/255,2/255, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values) or values != sorted(values):
        raise InvalidValueError(f"--eps-sweep needs increasing values >= 0, got {text!r}")
    return values


def check_suite_options(suite: str | None, norm: str, sweep: Sequence[float], plot: Path | None, attacks: bool) -> None:
    """Names from the suite and norm lists; --plot only with --eps-sweep, which needs attacks to sweep."""
    if suite is not None and suite not in names.SUITES:
        raise InvalidValueError(f"unknown suite {suite!r}; valid: {', '.join(names.SUITES)}")
    if norm not in names.NORMS:
        raise InvalidValueError(f"unknown norm {norm!r}; valid: {', '.join(names.NORMS)}")
    if plot is not None and not sweep:
        raise InvalidValueError("--plot draws the --eps-sweep curves: give --eps-sweep too")
    if sweep and suite is None and not attacks:
        raise InvalidValueError("--eps-sweep needs --suite or --attack")


def suite_spec(
    suite: str | None, norm: str, eps: str | None, steps: int | None, extra: list[str] | None, cls: Any
) -> Any:
    """The suite to run (None without --suite): --eps, --steps, and LABEL.KEY=VALUE options for its attacks."""
    if suite is None:
        return None
    from loradar_cli.cli._common import parse_attack_option, parse_fraction

    overrides: dict[str, dict[str, Any]] = {}
    for item in extra or []:  # LABEL.KEY=VALUE (split_suite_options kept only those naming a suite attack)
        label, field, value = parse_attack_option(item)
        overrides.setdefault(label, {})[field] = value
    return cls(suite, norm, parse_fraction(eps), steps, overrides)


def split_suite_options(suite: str | None, norm: str, items: list[str]) -> tuple[list[str], list[str]]:
    """--attack-opt items addressed to a suite attack (LABEL.KEY=VALUE), and the rest (for --attack)."""
    if suite is None:
        return [], items
    from loradar_cli.evaluation.suite import labels_of

    labels = set(labels_of(suite, norm))
    mine = [item for item in items if item.partition("=")[0].partition(".")[0] in labels]
    return mine, [item for item in items if item not in mine]


def print_flags(rows: Sequence[Any]) -> None:
    """Each row's sanity flags on stderr, one line each."""
    for row in rows:
        for flag in row.flags:
            console.print(f"[bold yellow]flag[/] {row.model}: [bold]{flag.id}[/] {flag.message}", highlight=False)


def plot_sweep(path: Path, rows: Sequence[Any], title: str) -> Path:
    """Robust accuracy against eps, one curve per row, to an image (matplotlib, headless backend)."""
    import matplotlib

    from loradar_cli.files import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        eps, acc = zip(*row.sweep, strict=True)
        ax.plot(
            [e * 255 for e in eps], [100 * a for a in acc], marker="o", label=f"{row.model} ({pct(row.clean)} % clean)"
        )
    ax.set_xlabel("eps (x 1/255)")
    ax.set_ylabel("robust accuracy (%), worst case")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
