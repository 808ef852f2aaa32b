"""User-facing errors: the CLI prints str(error) on one line and exits non-zero."""


class MixchatError(Exception):
    """A failure the user can act on (bad path, bad checkpoint, bad setting)."""


class CheckpointError(MixchatError):
    """A checkpoint is missing, truncated, unsafe (pickle) or does not match its config."""


class UnsupportedModelError(MixchatError):
    """An architecture or file format mixchat does not run."""
