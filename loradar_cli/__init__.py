"""loradar: robust, attack-specialised LoRA adapters for timm vision models.

Importing the package is cheap: torch and timm are imported by the modules that need them.
"""

__version__ = "0.1.0"
