"""The one exception every malformed VHD (or stored object) is reported with."""


class VHDError(Exception):
    """A VHD file (or its compressed stream) is malformed or does not fit.

    The message is a human-readable reason, meant to be shown to the user as
    the verification failure of a backup. Code that reads untrusted files
    catches this one class; anything else escaping is a bug (or a real I/O
    error of the underlying file object, which is not the file's fault).
    """
