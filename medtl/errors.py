"""Errors a user can act on. Stages print them as one paragraph, never a traceback."""


class MedtlError(Exception):
    """A user mistake or bad input: the message names the file or parameter and what was expected."""


class ParamsError(MedtlError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


class UnreadableImage(MedtlError):
    """A file could not be decoded into an image; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
