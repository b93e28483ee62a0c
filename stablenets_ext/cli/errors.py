"""The CLI's own error type."""


class CliError(ValueError):
    """A usage error found after parsing (reported like an argparse error)."""
