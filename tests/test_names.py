"""The torch-free names behind `--help` equal the registries they mirror."""

import pytest

from loradar_cli import names


def _registries() -> dict[str, object]:
    from loradar_cli.attacks import ATTACKS
    from loradar_cli.data import DATASETS
    from loradar_cli.evaluation.suite import SUITES
    from loradar_cli.jobs.ensemble_vote import ENSEMBLE_METHODS
    from loradar_cli.lora.init import LORA_INITS
    from loradar_cli.lora.inject import PRESETS
    from loradar_cli.ops.identify_modes import IDENTIFY_MODES
    from loradar_cli.ops.merge import MERGE_METHODS
    from loradar_cli.ops.vote import VOTE_METHODS
    from loradar_cli.recipes import RECIPES

    return {
        "ATTACKS": ATTACKS,
        "RECIPES": RECIPES,
        "LORA_INITS": LORA_INITS,
        "MERGE_METHODS": MERGE_METHODS,
        "VOTE_METHODS": VOTE_METHODS,
        "ENSEMBLE_METHODS": ENSEMBLE_METHODS,
        "IDENTIFY_MODES": IDENTIFY_MODES,
        "DATASETS": DATASETS,
        "SUITES": SUITES,
        "TARGET_PRESETS": PRESETS,
    }


@pytest.mark.parametrize("constant", sorted(_registries()))
def test_names_module_equals_its_registry(constant):
    assert sorted(getattr(names, constant)) == sorted(_registries()[constant])


def test_names_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, loradar_cli.names, loradar_cli.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_choices_reads_as_a_list():
    assert names.choices(("a",)) == "a"
    assert names.choices(("a", "b", "c")) == "a, b or c"
