"""The errors HiLight reports to a user as one line (``hilight CMD: message``, exit status 2).

Each names the user's file or setting and the reason. Anything else that escapes a command is
a bug in HiLight and is shown with its traceback.
"""

from __future__ import annotations


class HiLightError(Exception):
    """A problem with the user's input: a file, a setting, a request."""


class ConfigError(HiLightError, ValueError):
    """A configuration value is missing, unknown, or inconsistent with another."""


class DataError(HiLightError, ValueError):
    """A dataset file (records, tracks, captions) cannot be used."""


class CheckpointError(HiLightError, RuntimeError):
    """A checkpoint directory is missing, malformed, or does not match the model."""


class ConversionError(HiLightError, RuntimeError):
    """An original-format checkpoint cannot be converted."""


class ConversationError(HiLightError, ValueError):
    """A conversation cannot be encoded (bad roles, video markers, length)."""


class NoVideoError(ConversationError):
    """A question to a video model with no video in the conversation (and text-only not asked for)."""


class VideoError(HiLightError):
    """A video file cannot be used; ``path`` is the user's file and ``reason`` says why."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")
