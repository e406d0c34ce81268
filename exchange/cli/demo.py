"""`carbonx demo`."""


def demo() -> None:
    """Run the launch scenario."""
