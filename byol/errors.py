"""User-facing errors: entry points print their message without a stack trace."""


class ByolError(Exception):
    """A problem the user can fix; the message names it and says how."""


class ConfigError(ByolError):
    """An invalid configuration value (unknown tap, backbone, option...)."""


class DataError(ByolError):
    """A missing, empty or unreadable dataset."""


class CheckpointError(ByolError):
    """A checkpoint that cannot be used: unsafe, corrupt, or of another architecture."""
