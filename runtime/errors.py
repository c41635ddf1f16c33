class RunError(Exception):
    """A problem with the artifacts, the data or the device state, explained in one line."""
