"""One exception type per failure family; the CLI prints them in one line and exits non-zero."""


class QwenkitError(Exception):
    """Base of every error qwenkit raises on purpose (bad input, not bugs)."""


class ConfigError(QwenkitError):
    """A model or training config that is missing, malformed or unsupported."""


class CheckpointError(QwenkitError):
    """A weight file that is missing, truncated, corrupt or does not fit the model."""


class TokenizerError(QwenkitError):
    """Tokenizer files that are missing or malformed."""


class RequestError(QwenkitError):
    """A generation request that cannot be served (bad parameters, prompt too long)."""


class TrainingError(QwenkitError):
    """Training data or a run that cannot proceed: a missing data file, a malformed row under --strict."""
