"""`--resume`: a run interrupted after an epoch continues from its checkpoint to the very same adapter."""

import pytest
import torch

from loradar_cli.errors import InvalidValueError
from loradar_cli.jobs.train import resume_folder, train_and_store_adapter
from loradar_cli.recipes.checkpoint import STATE_FILE
from loradar_cli.recipes.loop import TrainConfig
from tests.conftest import make_base


class Interrupt(Exception):
    pass


def _interrupt_at(epoch: int):
    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith(f"epoch {epoch}/"):
            raise Interrupt

    return progress


def _train(store, name, base, recipe="loradar", **kwargs):
    config = TrainConfig(recipe=recipe, epochs=3, batch_size=16, lr=1e-2, seed=3, select="last")
    return train_and_store_adapter(
        store,
        name,
        base=base,
        attack="pgd",
        data="digits",
        # random starts: the global RNG (and a seeded attack's own generator) must resume too
        attack_options=kwargs.pop("attack_options", {"eps": 0.1, "alpha": 0.05, "steps": 2}),
        config=kwargs.pop("config", config),
        r=2,
        limit=32,
        val_limit=16,
        **kwargs,
    )


def _result(store, recipe: str, name: str):
    """(stored tensors, history without timings): autolora's result is a base, the others' an adapter."""
    if recipe == "autolora":
        stored = store.load_base(name)
        tensors, history = stored.state, stored.meta.origin["history"]
    else:
        stored = store.load_adapter(name)
        tensors, history = stored.tensors, stored.meta.combination["history"]
    return tensors, [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize("recipe", ["loradar", "amt", "autolora"])
def test_resume_after_an_interruption_gives_the_uninterrupted_adapter(store, recipe):
    base = make_base(store).name
    _train(store, "full", base, recipe)
    assert not resume_folder(store, "full").exists()  # removed once the entry is written

    with pytest.raises(Interrupt):
        _train(store, "cut", base, recipe, progress=_interrupt_at(2))
    assert (resume_folder(store, "cut") / STATE_FILE).is_file()
    assert not store.has_adapter("cut") and not store.has_base("cut")
    _train(store, "cut", base, recipe, resume=True)

    (a, history_a), (b, history_b) = _result(store, recipe, "full"), _result(store, recipe, "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history_a == history_b
    assert not resume_folder(store, "cut").exists()


@pytest.mark.parametrize(
    ("recipe", "options"), [("trades", {"inner": "attack"}), ("amt", {}), ("advlora", {}), ("hyperat", {})]
)
def test_resume_continues_a_seeded_attacks_own_generator(store, recipe, options):
    """A seeded PGD draws its random starts from its own generator (training and validation): resumed, it goes on
    from where the interrupted run left it, so the adapter and every epoch's metrics equal the uninterrupted run's.
    advlora's PGD-3 is an attack of its own (the recipe's state); hyperat attacks again to choose its merge."""
    base = make_base(store).name
    config = TrainConfig(recipe=recipe, recipe_options=options, epochs=3, batch_size=16, lr=1e-2, seed=3, select="last")
    seeded = {"eps": 0.3, "alpha": 0.1, "steps": 2, "seed": 11}
    _train(store, "full", base, config=config, attack_options=seeded)
    with pytest.raises(Interrupt):
        _train(store, "cut", base, config=config, attack_options=seeded, progress=_interrupt_at(3))
    saved = torch.load(resume_folder(store, "cut") / STATE_FILE, weights_only=True)["state"]
    assert list(saved["attack"]) == ["cpu"]  # the generator was used, and saved
    if recipe == "advlora":
        assert list(saved["recipe"]["inner"]) == ["cpu"]
    torch.manual_seed(12345)  # the global RNG is restored from the state, whatever it is now
    _train(store, "cut", base, config=config, attack_options=seeded, resume=True)

    (a, history_a), (b, history_b) = _result(store, recipe, "full"), _result(store, recipe, "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history_a == history_b


def test_without_resume_an_old_state_is_discarded_and_other_options_are_refused(store):
    base = make_base(store).name
    with pytest.raises(Interrupt):
        _train(store, "cut", base, progress=_interrupt_at(2))
    other = TrainConfig(epochs=3, batch_size=16, lr=5e-3, seed=3, select="last")
    with pytest.raises(InvalidValueError, match="other options"):
        _train(store, "cut", base, config=other, resume=True)
    meta = _train(store, "cut", base, config=other)  # a fresh run ignores (and replaces) the old state
    assert len(meta.combination["history"]) == 3 and not resume_folder(store, "cut").exists()


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_adapter(store):
    """A `loradar train` process killed (SIGKILL) once a checkpoint exists resumes to the uninterrupted result."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    make_base(store)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["--base", "tiny", "--attack", "pgd", "--eps", "0.1", "--steps", "2", "--limit", "64", "--val-limit", "16"]
    args += ["--epochs", "3", "--batch-size", "16", "--select", "last", "--store", str(store.root), "-q"]
    cmd = [sys.executable, "-m", "loradar_cli", "train", *args]
    subprocess.run([*cmd, "--name", "full"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, "--name", "cut"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = resume_folder(store, "cut") / STATE_FILE
    while not state.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not store.has_adapter("cut"), "the run finished before it could be killed"
    subprocess.run([*cmd, "--name", "cut", "--resume"], env=env, check=True, capture_output=True)
    a, b = store.load_adapter("full").tensors, store.load_adapter("cut").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_resume_after_an_interruption_gives_the_uninterrupted_base(store):
    from loradar_cli.jobs.finetune import finetune_base

    def fit(name: str, **kwargs):
        return finetune_base(
            store, name, model="test_resnet", data="digits", epochs=3, limit=64, batch_size=16, **kwargs
        )

    full = fit("full")
    with pytest.raises(Interrupt):
        fit("cut", progress=_interrupt_at_fit(2))
    assert (store.root / ".resume-base-cut" / STATE_FILE).is_file() and not store.has_base("cut")
    resumed = fit("cut", resume=True)
    assert resumed.fingerprint == full.fingerprint  # sha256 of the weights: bit-identical
    assert resumed.metrics == full.metrics and not (store.root / ".resume-base-cut").exists()


def _interrupt_at_fit(epoch: int):
    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith(f"fit epoch {epoch}/"):
            raise Interrupt

    return progress
