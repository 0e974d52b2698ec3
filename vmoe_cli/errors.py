"""The one exception type for mistakes a user can fix.

Library code raises `VmoeError` with a message that names the file, key or option
at fault and what to do; the CLI prints that message on one line, never a traceback.
"""


class VmoeError(Exception):
    """A user-fixable problem (bad path, bad recipe key, impossible setting)."""
