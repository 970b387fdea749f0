"""The eager backend: the decode-step functions run as written. Every other backend is tested
against it token for token."""

from .base import Segments


class EagerSegments(Segments):
    name = "eager"
