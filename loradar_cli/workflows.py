"""Old import path of the jobs (kept one release): use `loradar_cli.jobs.<command>` instead."""

from loradar_cli.attacks import attack_fields
from loradar_cli.attacks import route_options as route_attack_options
from loradar_cli.jobs.attack import craft_adv_set
from loradar_cli.jobs.evaluate import EnsembleRows, evaluate_models
from loradar_cli.jobs.finetune import finetune_base
from loradar_cli.jobs.train import lora_spec_for, train_and_store_adapter

__all__ = [
    "EnsembleRows",
    "attack_fields",
    "craft_adv_set",
    "evaluate_models",
    "finetune_base",
    "lora_spec_for",
    "route_attack_options",
    "train_and_store_adapter",
]
