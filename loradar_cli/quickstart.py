"""Old import path of the quickstart job (kept one release): use `loradar_cli.jobs.quickstart`."""

from loradar_cli.jobs.quickstart import QUICKSTART_ATTACKS, QuickstartReport, run_quickstart

__all__ = ["QUICKSTART_ATTACKS", "QuickstartReport", "run_quickstart"]
