"""LoRA layers, target selection and injection, and PEFT-compatible state dicts."""
