"""The command-line layer: parse options, call the library, print. No torch at import time."""
