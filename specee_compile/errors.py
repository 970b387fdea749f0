"""User-facing errors. Every message says what was expected, what was found, and what to do.

The CLI prints `SpecEEError`s as one line on stderr and exits non-zero, with no traceback.
"""

import argparse


class SpecEEError(Exception):
    """A problem with the user's input or environment, explained for the user."""


class ModelNotFound(SpecEEError):
    pass


class UnsupportedArchitecture(SpecEEError):
    pass


class ArtifactError(SpecEEError):
    """Missing, corrupt, partial, or mismatched (other model) artifacts."""


class InputError(SpecEEError):
    """Bad prompt: empty, or longer than the context allows."""


class SettingError(SpecEEError, ValueError):
    """A bad SPECEE_* environment setting (a kernel knob): named with what it expects."""


class BackendUnavailable(SpecEEError):
    """A backend's dependency (onnxruntime, tensorrt, CUDA) is not installed here."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived during a write; raised so that every `finally` cleanup runs.
    The CLI prints one line and exits with 128 + signum (130 for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors (a bad choice, a missing argument, an unknown flag) are one line on stderr,
    with where the help is, and exit code 2; its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")
