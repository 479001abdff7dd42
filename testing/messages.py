"""Task messages as orderflow's own code sends them: with their proof of origin (project/origin.py)."""

from collections.abc import Mapping, Sequence
from typing import Any

from project import origin


def proved(name: str, kwargs: Mapping[str, Any], args: Sequence[Any] = ()) -> dict[str, Any]:
    """`kwargs` without its proof, once the proof is found to be orderflow's for this message.

    For tests that compare a message's arguments with what they expect;
    AssertionError when the proof is missing or does not match.
    """
    reason = origin.refusal(name, list(args), dict(kwargs))
    assert reason is None, f"{name}{tuple(args)} {dict(kwargs)}: {reason}"
    return {key: value for key, value in kwargs.items() if key != origin.PROOF}


def signed(name: str, kwargs: Mapping[str, Any], args: Sequence[Any] = ()) -> dict[str, Any]:
    """`kwargs` with a proof added: a message a test sends as orderflow would (a duplicate, a late step)."""
    return origin.signed_kwargs(name, args, kwargs)
