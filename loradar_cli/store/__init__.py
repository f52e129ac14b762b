"""The adapter store: bases, adapters (PEFT layout + loradar.json) and identifiers, written atomically."""
