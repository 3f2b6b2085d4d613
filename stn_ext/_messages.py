"""Wording shared by error messages."""


def count(n, noun, plural=None):
    """'1 parameter', '3 parameters': a count with its noun in the right number."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
