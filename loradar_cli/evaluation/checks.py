"""Sanity checks that catch evaluations which overstate robustness, each raising a flag with a stable id.

After AutoAttack's checks (Croce & Hein, ICML 2020, arXiv:2003.01690; `fra31/auto-attack`, `checks.py`) and
the adaptive-attack guidance of Tramèr, Carlini, Brendel & Madry, "On Adaptive Attacks to Adversarial Example
Defenses", NeurIPS 2020, arXiv:2002.08347. "Noise" is two binomial standard errors of an accuracy on n points,
and at least one point.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from loradar_cli.attacks import Attack
from loradar_cli.metrics import correct, mean_flag, model_mode

BLACK_BOX = ("square", "square-l2")  # attacks that use scores only: they must not beat the gradient attacks
RANDOM_SPREAD = 1e-4  # relative logit spread above which a model counts as randomised (AutoAttack's threshold)
EOT_SAMPLES = 20  # gradient passes averaged per step against a randomised model (AutoAttack's "rand" version)
CHECK_STEPS = 20  # iteration cap of the attacks that the eps = 0, eps and steps checks run
CHECK_QUERIES = 100  # query cap of score-only attacks in the eps = 0 check (no query can move a point at eps = 0)


class SanityFlag(BaseModel):
    """A warning that the numbers may overstate robustness: stable id, one line of explanation."""

    id: str
    message: str


EXPLAIN = {
    "eps-zero-not-clean": "an attack at eps = 0 does not reproduce clean accuracy: the model or the attack is broken",
    "accuracy-rises-with-eps": "robust accuracy rises with eps beyond noise: the attack is failing (gradient masking?)",
    "accuracy-rises-with-steps": "more attack steps give higher accuracy beyond noise: the attack is not converging",
    "robust-above-clean": "a robust accuracy exceeds clean accuracy, which no correct attack allows",
    "black-box-beats-white-box": "a score-only attack broke points the gradient attacks missed: gradients are masked",
    "transfer-beats-white-box": "a transfer set fools the model more than white-box attacks do: gradients are masked",
    "transfer-overstates": "a transfer set's accuracy is far above white-box robustness: do not report it as robustness",
    "zero-gradient": "input gradients vanish on some points: gradient attacks cannot work there (use Square or BPDA)",
    "randomised": "outputs differ between identical forward passes in eval mode: gradient attacks use EOT",
    "too-few-classes": "the DLR losses need 3 (targeted: 4) classes; those attacks were skipped or limited",
}


def flag(flag_id: str, detail: str = "") -> SanityFlag:
    """A flag with its standard explanation, plus a detail such as the numbers that raised it."""
    return SanityFlag(id=flag_id, message=f"{EXPLAIN[flag_id]}{f' ({detail})' if detail else ''}")


def noise(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy p on n points, at least one point."""
    return max(2 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1)), 1 / max(n, 1))


@torch.no_grad()
def output_spread(model: nn.Module, x: Tensor, passes: int = 3) -> float:
    """Largest difference of eval-mode logits between identical passes, relative to their largest magnitude."""
    with model_mode(model, "eval"):
        outs = [model(x) for _ in range(passes)]
    scale = outs[0].abs().amax().clamp_min(1e-12)
    return max(((o - outs[0]).abs().amax() / scale).item() for o in outs[1:])


def check_randomised(model: nn.Module, x: Tensor, passes: int = 3) -> list[SanityFlag]:
    """Flag a model whose eval-mode logits differ across identical passes (relative 1e-4, as AutoAttack)."""
    spread = output_spread(model, x, passes)
    return [flag("randomised", f"relative spread {spread:.2g} over {passes} passes")] if spread > RANDOM_SPREAD else []


def eot_if_randomised(
    model: nn.Module, attacks: Mapping[str, Attack[Any]], x: Tensor, samples: int = EOT_SAMPLES
) -> tuple[dict[str, Attack[Any]], list[SanityFlag]]:
    """The attacks with EOT over `samples` passes where `model` is randomised (flagged, naming them), else as given.

    Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018,
    arXiv:1802.00420: a single draw's gradient understates what an attacker who averages draws achieves.
    Attacks already set to `eot > 1` keep their own count; attacks without the option are unchanged.
    """
    spread = output_spread(model, x)
    if spread <= RANDOM_SPREAD:
        return dict(attacks), []
    out, changed = {}, []
    for label, attack in attacks.items():
        if getattr(attack.config, "eot", None) == 1:
            attack = type(attack)(attack.config.model_copy(update={"eot": samples}))
            changed.append(label)
        out[label] = attack
    done = f"EOT over {samples} passes: {', '.join(changed)}" if changed else "no attack takes EOT"
    return out, [flag("randomised", f"relative spread {spread:.2g} over 3 passes; {done}")]


def check_gradients(targets: Mapping[str, nn.Module], x: Tensor, y: Tensor) -> list[SanityFlag]:
    """Flag targets whose cross-entropy input gradient is zero (below 1e-20) on some points."""
    flags = []
    for name, target in targets.items():
        with model_mode(target, "eval"), torch.enable_grad():
            inp = x.detach().clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(target(inp), y, reduction="sum")
            grad = torch.autograd.grad(loss, inp, allow_unused=True)[0] if loss.requires_grad else None
        zero = len(x) if grad is None else int((grad.flatten(1).abs().amax(1) <= 1e-20).sum())
        if zero:
            flags.append(flag("zero-gradient", f"{zero} of {len(x)} points, attacked through {name}"))
    return flags


def usable_attacks(
    attacks: Mapping[str, Attack[Any]], num_classes: int
) -> tuple[dict[str, Attack[Any]], list[SanityFlag]]:
    """Drop DLR attacks the class count cannot support and cap APGD-T's targets at C - 1 (flagged either way)."""
    kept, notes = {}, []
    for label, attack in attacks.items():
        config = attack.config
        targeted = hasattr(config, "targets")
        needed = 4 if targeted else 3 if getattr(config, "loss", None) == "dlr" else 0
        if num_classes < needed:
            notes.append(f"{label} skipped ({num_classes} classes)")
            continue
        if targeted and config.targets > num_classes - 1:
            notes.append(f"{label} limited to {num_classes - 1} targets")
            attack = type(attack)(config.model_copy(update={"targets": num_classes - 1}))
        kept[label] = attack
    return kept, ([flag("too-few-classes", "; ".join(notes))] if notes else [])


@dataclass(frozen=True)
class Probe:
    """One attack run of a sanity check on the check points, independent of the others (processes may share them).

    `cost` is a rough count of passes per point, for balancing; the run is seeded, so an unseeded attack draws the
    same wherever it runs.
    """

    cost: float
    run: Callable[[], Any]
    seed: int = 0

    def __call__(self) -> Any:
        torch.manual_seed(self.seed)
        return self.run()


Runner = Callable[[Sequence[Probe]], list[Any]]


def run_here(probes: Sequence[Probe]) -> list[Any]:
    """Run the probes one after the other in this process."""
    return [probe() for probe in probes]


def attack_cost(attack: Attack[Any]) -> float:
    """Passes per point an attack may make: 3 per gradient step (forward and backward) or 1 per query."""
    config = attack.config
    steps, queries = getattr(config, "steps", None), getattr(config, "queries", None)
    per_run = 3 * steps if steps else (queries or 1)
    return float(per_run * (getattr(config, "restarts", 1) or 1) * (getattr(config, "targets", 1) or 1))


def capped(attack: Attack[Any], **update: Any) -> Attack[Any]:
    """The attack with `update` applied and at most CHECK_STEPS steps and CHECK_QUERIES queries."""
    config = attack.config
    caps = {"steps": CHECK_STEPS, "queries": CHECK_QUERIES}
    update = {**{k: min(getattr(config, k), cap) for k, cap in caps.items() if hasattr(config, k)}, **update}
    return type(attack)(config.model_copy(update=update))


def eps_zero_probes(
    judge: nn.Module, target: nn.Module, attacks: Mapping[str, Attack[Any]], x: Tensor, y: Tensor
) -> dict[str, Probe]:
    """Per attack (patches excluded), whether it changes a prediction at eps = 0 (it must not)."""
    clean = correct(judge, x, y)

    def changes(zero: Attack[Any]) -> bool:
        return not torch.equal(_still_right(judge, target, zero, x, y, clean), clean)

    probes = {}
    for label, attack in attacks.items():
        if attack.threat_model != "patch":
            zero = capped(attack, eps=0.0)
            probes[label] = Probe(attack_cost(zero), partial(changes, zero))
    return probes


def _still_right(
    judge: nn.Module, target: nn.Module, attack: Attack[Any], x: Tensor, y: Tensor, clean: Tensor
) -> Tensor:
    """Per point: right on the clean input (`clean`) and not fooled by `attack`, which attacks `target` while the
    judge decides."""
    _, fooled = attack.until_fooled(target, x, y, judge=None if judge is target else judge)
    return clean & ~fooled


def eps_zero_flags(changed: Mapping[str, bool]) -> list[SanityFlag]:
    """Every attack at eps = 0 must leave accuracy at its clean value."""
    bad = [label for label, moved in changed.items() if moved]
    return [flag("eps-zero-not-clean", ", ".join(bad))] if bad else []


def monotone_probes(judge: nn.Module, target: nn.Module, attack: Attack[Any], x: Tensor, y: Tensor) -> dict[str, Probe]:
    """Robust accuracy under the attack at eps/2 ("half"), as given ("full"), and with twice its steps ("more")."""

    def accuracy(variant: Attack[Any]) -> float:
        return mean_flag(_still_right(judge, target, variant, x, y, correct(judge, x, y)))

    config = attack.config
    variants = {"half": config.model_copy(update={"eps": config.eps / 2}), "full": config}
    steps_field = next((k for k in ("steps", "queries") if hasattr(config, k)), None)
    if steps_field:
        variants["more"] = config.model_copy(update={steps_field: 2 * getattr(config, steps_field)})
    built = {name: type(attack)(c) for name, c in variants.items()}
    return {name: Probe(attack_cost(v), partial(accuracy, v)) for name, v in built.items()}


def monotone_flags(label: str, accuracy: Mapping[str, float], n: int) -> list[SanityFlag]:
    """Accuracy must not rise beyond noise from eps/2 to eps, nor from the attack's steps to twice as many."""
    flags, half, full = [], accuracy["half"], accuracy["full"]
    if full > half + noise(half, n):
        flags.append(flag("accuracy-rises-with-eps", f"{label}: {half:.3f} at eps/2, {full:.3f} at eps"))
    more = accuracy.get("more")
    if more is not None and more > full + noise(full, n):
        flags.append(flag("accuracy-rises-with-steps", f"{label}: {full:.3f}, {more:.3f} with twice the steps"))
    return flags


def check_monotone(
    judge: nn.Module, target: nn.Module, attack: Attack[Any], label: str, x: Tensor, y: Tensor
) -> list[SanityFlag]:
    """One attack at eps/2 vs eps and at its steps vs twice its steps, run here in that order."""
    probes = monotone_probes(judge, target, attack, x, y)
    return monotone_flags(label, dict(zip(probes, run_here(list(probes.values())), strict=True)), len(x))


def pre_checks(
    judge: nn.Module,
    targets: Mapping[str, nn.Module],
    attacks: Mapping[str, Attack[Any]],
    x: Tensor,
    y: Tensor,
    run: Runner = run_here,
) -> list[SanityFlag]:
    """Gradients, eps = 0 and monotonicity in eps and steps on a few points, their attack runs handed to `run`.

    The monotonicity checks use the first gradient attack, capped at CHECK_STEPS steps.
    """
    target = next(iter(targets.values()))
    groups: dict[str, dict[str, Probe]] = {
        "gradients": {"": Probe(1.0, partial(check_gradients, targets, x, y))},
        "eps-zero": eps_zero_probes(judge, target, attacks, x, y),
    }
    gradient = [(lbl, a) for lbl, a in attacks.items() if a.name not in BLACK_BOX and a.threat_model != "patch"]
    if gradient:
        groups["monotone"] = monotone_probes(judge, target, capped(gradient[0][1]), x, y)
    keys = [(group, key) for group, probes in groups.items() for key in probes]
    probes = [replace(groups[g][k], seed=i) for i, (g, k) in enumerate(keys)]
    results: dict[str, dict[str, Any]] = {group: {} for group in groups}
    for (group, key), result in zip(keys, run(probes), strict=True):
        results[group][key] = result
    flags = results["gradients"][""] + eps_zero_flags(results["eps-zero"])
    if gradient:
        flags += monotone_flags(gradient[0][0], results["monotone"], len(x))
    return flags


def check_results(
    clean: float,
    worst: float,
    n: int,
    records: list[Any],
    adv_sets: Mapping[str, float],
    suite_fooled: Mapping[str, int],
) -> list[SanityFlag]:
    """Flags from the numbers alone: robust above clean, black-box or transfer beating white-box, unconfirmed hits."""
    flags = []
    above = [r.label for r in records if r.robust_after > clean + 1e-9 or (r.robust_alone or 0) > clean + 1e-9]
    above += [f"set {s}" for s, acc in adv_sets.items() if acc > clean + noise(clean, n)]
    if above:
        flags.append(flag("robust-above-clean", ", ".join(above)))
    threshold = max(1, math.ceil(0.002 * n))
    for label, count in suite_fooled.items():
        if count > threshold:
            flags.append(
                flag("black-box-beats-white-box", f"{label} broke {count} of {n} points gradient attacks left")
            )
    if records and any(r.unconfirmed for r in records):
        flags.append(flag("randomised", "attack results did not reproduce when re-scored"))
    for s, acc in adv_sets.items():
        if records and acc < worst - noise(worst, n):
            flags.append(flag("transfer-beats-white-box", f"set {s}: {acc:.3f} vs white-box {worst:.3f}"))
        elif records and acc > worst + max(0.1, noise(worst, n)):
            flags.append(flag("transfer-overstates", f"set {s}: {acc:.3f} vs white-box {worst:.3f}"))
    return flags
