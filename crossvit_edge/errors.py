"""The one exception type that the CLIs turn into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a checkpoint): reported in one line, no traceback."""


def brief(value, limit: int = 60) -> str:
    """A bounded description of an untrusted value for an error message: short strings and numbers
    as they are, long strings cut (with their length), containers by type and size. Error messages
    must never echo an unbounded value (a YAML alias bomb expands to megabytes)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        # str() of a huge int is slow and refused past 4300 digits
        return repr(value) if value.bit_length() <= 64 else f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:limit]) + (f"... ({len(value)} characters)" if len(value) > limit else "")
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return f"a mapping of {len(value)} key{'s' if len(value) != 1 else ''}"
    return f"a {type(value).__name__}"
