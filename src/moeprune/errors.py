"""moeprune's user-facing errors (every module raises these; the CLI prints them as one line, exit 2)."""


class MoePruneError(ValueError):
    """A user-facing error: the message names the problem and the fix."""


class NotMoE(MoePruneError):
    """The model has no routed experts (a dense model): nothing to prune."""
