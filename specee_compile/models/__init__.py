"""Models: find, load, fingerprint. `load_model(name)` is the one entry point most code needs."""

from .fingerprint import model_fingerprint
from .loader import SUPPORTED_ARCHITECTURES, LoadedModel, load_config, load_model, resolve
from .pypi import cache_dir
from .smollm2 import fetch_smollm2
from .zoo import DEFAULT_MODEL, ZOO, ZooEntry

__all__ = [
    "DEFAULT_MODEL",
    "SUPPORTED_ARCHITECTURES",
    "ZOO",
    "LoadedModel",
    "ZooEntry",
    "cache_dir",
    "fetch_smollm2",
    "load_config",
    "load_model",
    "model_fingerprint",
    "resolve",
]
