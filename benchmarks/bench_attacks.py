"""Attack, evaluation, training-step and ensemble costs, each measured side by side with its baseline in one run.

`rows(quick)` follows the runner's contract: one dict per row with row, baseline, ratio, goal, met, threads,
device and detail. Times are process CPU seconds (one intra-op thread unless the runner sets more), minimum over
interleaved repeats: on a shared machine wall time measures the neighbours as much as the code.

Per-batch costs (attack generation, training step, ensemble inference) use timm `test_resnet`, `resnet18` and
`test_vit` at 32x32 (quick: `test_resnet` only) fitted briefly to a synthetic 10-class task. Early stopping depends
on how many points a model gets wrong and how fast an attack fools the rest, which a synthetic task does not
reproduce, so its rows use models trained on the real CIFAR-10 and MNIST subsets (LORADAR_DATA).
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import Counting, data_root

SIZE = 32


def _timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Minimum CPU seconds per function over `repeats` interleaved rounds, after one warm-up call each."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - start)
    return best


def _task(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A synthetic 10-class image task: one smooth random prototype per class plus noise, in [0, 1]."""
    protos = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(12345))  # the same task for every seed
    protos = F.interpolate(protos, size=SIZE, mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = (0.3 * protos[y] + 0.7 * torch.rand(n, 3, SIZE, SIZE, generator=gen)).clamp(0, 1)
    return x, y


def _model(arch: str, epochs: int) -> nn.Module:
    """A timm model (32x32, 10 classes) fitted to 2,048 images of the synthetic task, eval mode."""
    import timm

    torch.manual_seed(0)
    kwargs = {"img_size": SIZE} if "vit" in arch else {}
    x, y = _task(2048, seed=1)
    return _fit(timm.create_model(arch, pretrained=False, num_classes=10, in_chans=3, **kwargs), x, y, epochs)


def _row(row: str, baseline: str, ratio: float, goal: str, met: bool, detail: str) -> dict[str, Any]:
    return {
        "row": row,
        "baseline": baseline,
        "ratio": round(ratio, 3),
        "goal": goal,
        "met": bool(met),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "detail": detail,
    }


def _pgd_rows(arch: str, model: nn.Module, x: Tensor, y: Tensor, repeats: int) -> list[dict[str, Any]]:
    """PGD-10 generation against torchattacks.PGD and against its floor of 10 x (forward + input backward) + 1 forward."""
    import torchattacks

    from loradar_cli.attacks import build_attack

    ours = build_attack("pgd", eps=8 / 255, alpha=2 / 255, steps=10, seed=0)
    theirs = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)

    def floor() -> None:
        for _ in range(10):
            inp = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(inp), y), inp)
        with torch.no_grad():
            model(x)

    t = _timed({"ours": lambda: ours(model, x, y), "torchattacks": lambda: theirs(x, y), "floor": floor}, repeats)
    speed = t["torchattacks"] / t["ours"]
    over = t["ours"] / t["floor"]
    shape = f"{arch} batch {len(x)}x3x{SIZE}x{SIZE}"
    return [
        _row(f"PGD-10 L-inf generation, {arch}", "torchattacks.PGD", speed, ">= 1.0x", speed >= 1.0,
             f"{shape}: ours {t['ours']:.3f} s, torchattacks {t['torchattacks']:.3f} s (speed-up)"),
        _row(f"PGD-10 generation vs floor, {arch}", "10 x (fwd + input-grad bwd) + 1 fwd", over, "<= 1.05x",
             over <= 1.05, f"{shape}: ours {t['ours']:.3f} s, floor {t['floor']:.3f} s (time ratio)"),
    ]  # fmt: skip


def _lora(model: nn.Module, seed: int) -> nn.Module:
    """A copy of `model` with random rank-4 LoRA factors on every conv and linear layer and a trainable head."""
    import copy

    from loradar_cli.jobs.train import lora_spec_for
    from loradar_cli.lora.inject import inject_lora, lora_layers
    from loradar_cli.models import ImageClassifier

    wrapped = ImageClassifier(copy.deepcopy(model), [0.0] * 3, [1.0] * 3)
    for p in wrapped.parameters():
        p.requires_grad_(False)
    spec = lora_spec_for(wrapped, r=4, lora_alpha=None, targets=None, train_head=True)
    torch.manual_seed(seed)
    inject_lora(wrapped.model, spec)
    for layer in lora_layers(wrapped.model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.02)
    return wrapped.eval()


def _training_row(arch: str, model: nn.Module, x: Tensor, y: Tensor, repeats: int) -> dict[str, Any]:
    """One PGD-AT step of the training loop's batch body on one batch vs the attack plus one forward/backward."""
    from loradar_cli.attacks import build_attack
    from loradar_cli.lora.inject import trainable_parameters
    from loradar_cli.recipes import build_recipe
    from loradar_cli.recipes.loop import adapter_train_mode

    adapted = _lora(model, seed=0)
    attack = build_attack("pgd", eps=8 / 255, alpha=2 / 255, steps=10, seed=0)
    recipe = build_recipe("pgd-at")
    params = trainable_parameters(adapted)
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step() -> None:  # the body of recipes.loop.train_epoch for one batch, without augmentation or scaling
        adapter_train_mode(adapted) if recipe.frozen_norm_stats else adapted.train()
        out = recipe.step(adapted, x, y, attack)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        recipe.after_step(adapted)
        adapted.eval()

    def floor() -> None:
        x_adv = attack(adapted, x, y)
        F.cross_entropy(adapted(x_adv), y).backward()
        for p in params:
            p.grad = None

    t = _timed({"step": step, "floor": floor}, repeats)
    trainable = {id(p) for p in params}
    base_grads = [p for p in adapted.parameters() if id(p) not in trainable and p.grad is not None]
    ratio = t["step"] / t["floor"]
    return _row(
        f"adversarial LoRA training step, {arch}", "attack + one fwd/bwd of the adapted model", ratio,
        "<= 1.15x, no grads on base weights", ratio <= 1.15 and not base_grads,
        f"batch {len(x)}, PGD-10, pgd-at: step {t['step']:.3f} s, floor {t['floor']:.3f} s; base params with grad: {len(base_grads)}",
    )  # fmt: skip


def _merged(adapted: nn.Module) -> nn.Module:
    """The adapted model with every LoRA delta folded into its base weights (plain layers, same architecture)."""
    import copy

    from loradar_cli.lora.inject import lora_layers

    merged = copy.deepcopy(adapted)
    for name, layer in lora_layers(merged.model).items():
        base = layer.base_layer
        with torch.no_grad():
            base.weight += layer.delta_weight()
        _replace(merged.model, name, base)
    return merged.eval()


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _ensemble_rows(arch: str, model: nn.Module, x: Tensor, repeats: int) -> list[dict[str, Any]]:
    """K = 4 adapters: the project's ensemble forward vs K merged forwards and vs a PEFT mixed-adapter batch."""
    from loradar_cli.members import ensemble_probs
    from loradar_cli.models import ImageClassifier

    adapted = [_lora(model, seed=k) for k in range(4)]
    merged = [_merged(a) for a in adapted]
    with torch.no_grad():
        torch.testing.assert_close(merged[0](x), adapted[0](x), atol=1e-3, rtol=1e-3)
    plain = ImageClassifier(model, [0.0] * 3, [1.0] * 3).eval()  # the same wrapper as the merged models
    fns: dict[str, Callable[[], Any]] = {
        "ours": lambda: ensemble_probs(merged, x, batch_size=len(x)),
        "merged": lambda: [m(x) for m in merged],
        "base": lambda: plain(x),
        "one merged": lambda: merged[0](x),
    }
    peft_note = _peft_mixed(model, adapted, x, fns)
    with torch.no_grad():
        t = _timed(fns, repeats)
    rows = [
        _row(f"ensemble K=4 inference, {arch}", "K forwards with merged weights", t["ours"] / t["merged"], "<= 1.10x",
             t["ours"] / t["merged"] <= 1.10, f"batch {len(x)}: ours {t['ours']:.3f} s, merged {t['merged']:.3f} s (time ratio)"),
        _row(f"merged adapter inference, {arch}", "the base alone", t["one merged"] / t["base"], "<= 1.02x",
             t["one merged"] / t["base"] <= 1.02, f"batch {len(x)}: merged {t['one merged']:.4f} s, base {t['base']:.4f} s"),
    ]  # fmt: skip
    if "peft" in t:
        speed = t["peft"] / t["ours"]
        rows.append(_row(f"ensemble K=4 inference, {arch}", "PEFT mixed-adapter batch", speed, ">= 1.1x faster",
                         speed >= 1.1, f"ours {t['ours']:.3f} s, PEFT {t['peft']:.3f} s (speed-up)"))  # fmt: skip
    else:
        rows.append(
            _row(f"ensemble K=4 inference, {arch}", "PEFT mixed-adapter batch", 0.0, ">= 1.1x faster", False, peft_note)
        )
    return rows


def _peft_mixed(model: nn.Module, adapted: list[nn.Module], x: Tensor, fns: dict[str, Callable[[], Any]]) -> str:
    """Adds fns['peft']: one PEFT model holding the K adapters, the batch repeated K times with adapter_names."""
    import copy

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return "peft not installed"
    from loradar_cli.lora.inject import lora_layers

    layers = lora_layers(adapted[0].model)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(layers))
    peft_model = get_peft_model(copy.deepcopy(model), config, adapter_name="a0")
    for k in range(1, len(adapted)):
        peft_model.add_adapter(f"a{k}", config)
    for k, adapter in enumerate(adapted):
        for name, layer in lora_layers(adapter.model).items():
            target = peft_model.base_model.model.get_submodule(name)
            with torch.no_grad():
                target.lora_A[f"a{k}"].weight.copy_(layer.lora_A.weight)
                target.lora_B[f"a{k}"].weight.copy_(layer.lora_B.weight)
    peft_model.eval()
    names = [f"a{k}" for k in range(len(adapted)) for _ in range(len(x))]
    xs = x.repeat(len(adapted), 1, 1, 1)
    try:
        with torch.no_grad():
            peft_model(xs, adapter_names=names)
    except Exception as err:  # PEFT's mixed batches do not cover every layer type
        return f"PEFT mixed batch failed: {type(err).__name__}: {err}"[:200]
    fns["peft"] = lambda: peft_model(xs, adapter_names=names)
    return ""


def _shared_data() -> Path | None:
    """The real data folder (LORADAR_DATA, else ../shared/data beside the checkout), if it exists."""
    root = data_root()
    return root if root.is_dir() else None


def _fit(model: nn.Module, x: Tensor, y: Tensor, epochs: int, eps: float = 0.0) -> nn.Module:
    """Adam on (x, y) for `epochs` (FGSM-RS adversarial training at `eps` when positive), then eval mode."""
    from loradar_cli.attacks import build_attack

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    attack = build_attack("pgd", eps=eps, alpha=1.25 * eps, steps=1, seed=0) if eps else None
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb = attack(model, x[idx], y[idx]) if attack else x[idx]
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
    return model.eval()


def _early_stop_row(quick: bool, repeats: int, eps: float = 0.0) -> dict[str, Any]:
    """Robust accuracy under PGD-10 (eps 8/255) of a CIFAR-10 test_resnet, undefended or FGSM-RS trained at `eps`.

    The suite skips points misclassified clean and stops on a point once it is fooled; torchattacks attacks
    every point for all ten steps. Both run on the same model and points; images seen by the model are counted.
    """
    import timm
    import torchattacks

    from loradar_cli.attacks import build_attack
    from loradar_cli.data import load_data
    from loradar_cli.evaluation import run_suite

    root = _shared_data()
    label, goal = ("undefended", 3.0) if not eps else (f"robust (FGSM-RS at {eps * 255:.0f}/255)", 1.3)
    name = f"robust acc under PGD-10, {label} CIFAR-10 model, test_resnet"
    goal_text = f">= {goal}x, same or lower acc"
    if root is None or not (root / "cifar-10-batches-py").is_dir():
        return _row(name, "torchattacks on all points, then counting", 0.0, goal_text, False,
                    "CIFAR-10 data not found (LORADAR_DATA or ../shared/data): not measured")  # fmt: skip
    train, test = (
        load_data(f"cifar10:{root}", "train"),
        load_data(f"cifar10:{root}", "test", limit=256 if quick else 512),
    )
    torch.manual_seed(0)
    epochs = 2 if quick else 4
    model = _fit(timm.create_model("test_resnet", num_classes=10), train.x, train.y, epochs=epochs, eps=eps)
    x, y = test.x, test.y
    counted = Counting(model)
    attack = {"pgd": build_attack("pgd", eps=8 / 255, alpha=2 / 255, steps=10, seed=0)}
    theirs = torchattacks.PGD(counted, eps=8 / 255, alpha=2 / 255, steps=10)
    acc: dict[str, float] = {}
    seen: dict[str, int] = {}

    def ours() -> None:
        counted.seen = 0
        acc["ours"] = run_suite(counted, x, y, attack, batch_size=128).robust.float().mean().item()
        seen["ours"] = counted.seen

    def baseline() -> None:
        counted.seen = 0
        hits = []
        for i in range(0, len(x), 128):
            x_adv = theirs(x[i : i + 128], y[i : i + 128])
            with torch.no_grad():
                hits.append(counted(x_adv).argmax(1) == y[i : i + 128])
        acc["theirs"] = torch.cat(hits).float().mean().item()
        seen["theirs"] = counted.seen

    t = _timed({"ours": ours, "torchattacks": baseline}, repeats)
    speed = t["torchattacks"] / t["ours"]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    same_or_lower = acc["ours"] <= acc["theirs"] + 0.01
    return _row(
        name, "torchattacks on all points, then counting", speed, goal_text, speed >= goal and same_or_lower,
        f"n={len(x)} CIFAR-10 test images, clean {clean:.3f}, robust ours {acc['ours']:.3f} vs torchattacks "
        f"{acc['theirs']:.3f}; {t['ours']:.2f} s vs {t['torchattacks']:.2f} s; images through the model "
        f"{seen['ours']} vs {seen['theirs']} ({seen['theirs'] / max(seen['ours'], 1):.1f}x fewer)",
    )  # fmt: skip


README_ATTACKS = {  # the README's MNIST eval: PGD-20 and FGSM at eps 0.1, ROA's defaults, FIA at eps 0.1
    "pgd": {"eps": 0.1, "alpha": 0.01, "steps": 20},
    "fgsm": {"eps": 0.1},
    "roa": {},
    "fia": {"eps": 0.1},
}


def _readme_eval_row(quick: bool) -> dict[str, Any]:
    """The README's MNIST eval attacks on an undefended and an adversarially trained test_resnet.

    Today's runner (early stopping: misclassified points skipped, each attack only on survivors, stopping on a
    point once fooled) against the previous evaluation's way, every attack on every point to the end, in the
    same process; both must give the same per-point worst case. Models are trained here (no store needed), so
    the rows are the README's base and a stand-in for its robust adapters, not the adapters themselves.
    """
    import timm

    from loradar_cli.attacks import build_attack
    from loradar_cli.data import load_data
    from loradar_cli.evaluation import run_suite

    root = _shared_data()
    name = "README MNIST eval attacks (PGD-20, FGSM, ROA, FIA), test_resnet"
    baseline = "every attack on every point (previous evaluation), same run"
    if root is None or not (root / "mnist").is_dir():
        return _row(name, baseline, 0.0, ">= 3.0x", False, "MNIST data not found: not measured")
    train = load_data(f"mnist:{root / 'mnist'}", "train", limit=4000)
    test = load_data(f"mnist:{root / 'mnist'}", "test", limit=128 if quick else 256)
    attacks = {k: build_attack(k, seed=0, **v) for k, v in README_ATTACKS.items()}
    times, parts = {"ours": 0.0, "every point": 0.0}, []
    for label, eps in (("base", 0.0), ("FGSM-RS eps 0.1", 0.1)):
        torch.manual_seed(0)
        model = _fit(timm.create_model("test_resnet", num_classes=10, in_chans=1), train.x, train.y, 2, eps=eps)
        flags = {}
        for mode, early in (("ours", True), ("every point", False)):
            start = time.process_time()
            flags[mode] = run_suite(model, test.x, test.y, attacks, early_stop=early, batch_size=128).robust
            times[mode] += time.process_time() - start
        if not torch.equal(flags["ours"], flags["every point"]):
            raise RuntimeError(f"{label}: early stopping changed the worst case")
        parts.append(f"{label} worst case {flags['ours'].float().mean().item():.3f}")
    speed = times["every point"] / times["ours"]
    return _row(
        name, baseline, speed, ">= 3.0x", speed >= 3.0,
        f"n={len(test.y)} MNIST test images, 2 models ({'; '.join(parts)}, identical per point): "
        f"{times['ours']:.1f} s vs {times['every point']:.1f} s",
    )  # fmt: skip


def rows(quick: bool) -> list[dict[str, Any]]:
    """All rows of this group (quick: test_resnet only, fewer points and epochs)."""
    threads = torch.get_num_threads()
    out: list[dict[str, Any]] = []
    archs = ["test_resnet"] if quick else ["test_resnet", "resnet18", "test_vit"]
    for arch in archs:
        repeats = 3 if quick or arch == "resnet18" else 5  # resnet18's calls are long enough to be steady
        base = _model(arch, epochs=1 if quick else 2)
        xb, yb = _task(64, seed=2)
        out += _pgd_rows(arch, base, xb, yb, repeats)
        out.append(_training_row(arch, base, xb[:32], yb[:32], repeats))
        out += _ensemble_rows(arch, base, xb, repeats)
    out.append(_early_stop_row(quick, 3))
    out.append(_early_stop_row(quick, 3, eps=8 / 255))
    out.append(_readme_eval_row(quick))
    for row in out:
        row["threads"] = threads
    return out


if __name__ == "__main__":
    import json
    import sys

    for row in rows(quick="--full" not in sys.argv):
        print(json.dumps(row))
