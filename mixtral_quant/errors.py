"""The project's one error type.

Every failure a user can cause (a missing path, a config that is not Mixtral, a corrupted
shard, a bad recipe) is raised as :class:`MixtralQuantError` with a message that says what is
wrong and what to do. The CLI prints it as one line and exits non-zero; ``--debug`` shows
the traceback.
"""

from __future__ import annotations


class MixtralQuantError(Exception):
    """A user-facing error: the message is one line that names the problem and the fix."""


class CheckpointError(MixtralQuantError):
    """A checkpoint on disk is missing, corrupted or does not match the config."""


class ConfigError(MixtralQuantError):
    """A config.json or recipe is not one this tool can use."""


class IntegrityError(MixtralQuantError):
    """An artifact's files do not match its manifest, or a run's partial files do not match the run."""
