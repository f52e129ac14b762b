"""torchattacks as a test oracle: skipped locally when missing, an error in CI (where it must be installed)."""

import os
from types import ModuleType

import pytest


def torchattacks() -> ModuleType:
    """The torchattacks module; in CI (env CI set) a missing install fails instead of skipping."""
    try:
        import torchattacks as module
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("torchattacks not installed (CI installs it)")
    return module
