"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class PipelineError(Exception):
    """Bad input or a stage run out of order: the message names the file, column, key or value."""
