"""Proof of origin for task messages: an HMAC that only orderflow's own code puts in a message it sends.

Anyone who can publish to the broker (a leaked broker password, Flower's
*async-apply*) can send ``inventory.stock_reserve`` with any arguments. The
steps that change what a service holds therefore carry a ``proof`` keyword
argument: an HMAC-SHA256 of the task's name and its arguments, keyed by a key
derived from SECRET_KEY (Django's `salted_hmac`, salt SALT), computed by the
code that decides to send the step (orders when it starts a saga or its
compensation, a step when it compensates, inventory when it announces a
product). A worker runs such a task only when the proof matches
(project/admission.py); anything else is refused before it runs.

What the proof covers: the task name, the positional arguments and every
keyword argument except the proof itself and ``last_error`` (which a retry
adds; the retry keeps the rest, so its proof still holds). It does not cover
time: a copy of a real message is a duplicate, which the steps' idempotency
keys already make harmless (docs/design.md, "Idempotency keys").
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from django.conf import settings
from django.utils.crypto import constant_time_compare, salted_hmac

#: The keyword argument that carries the proof.
PROOF = "proof"
#: Keyword arguments left out of the proof: the proof, and what a retry adds (project.saga.SagaStep._retry).
UNSIGNED_KWARGS = frozenset({PROOF, "last_error"})
#: Separates this HMAC's key from Django's other uses of SECRET_KEY (sessions, signing).
SALT = "orderflow.origin.task-message"


class NotJSON(TypeError):
    """The arguments are not plain JSON (lists, dicts with string keys, strings, numbers, booleans, null)."""


def _canonical(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    signed = {key: value for key, value in kwargs.items() if key not in UNSIGNED_KWARGS}
    try:
        # Sorted keys and no whitespace: the sender's dict order and the JSON round
        # trip through the broker do not change the text (floats keep their repr).
        return json.dumps([name, list(args), signed], sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise NotJSON(str(exc)) from exc


def _digest(text: str, secret: str) -> str:
    return salted_hmac(SALT, text, secret=secret, algorithm="sha256").hexdigest()


def proof(name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> str:
    """The proof for a message of task `name` with these arguments: 64 hex digits.

    Keyed by SECRET_KEY. Raises NotJSON when an argument is not plain JSON
    (a Decimal, a datetime, a model instance): the broker would not carry it
    unchanged, so no proof could match on the other side.
    """
    return _digest(_canonical(name, args, kwargs or {}), settings.SECRET_KEY)


def signed_kwargs(name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`kwargs` with its proof added under PROOF: what to publish as the message's keyword arguments."""
    kwargs = dict(kwargs or {})
    kwargs.pop(PROOF, None)
    return {**kwargs, PROOF: proof(name, args, kwargs)}


def _keys() -> Iterable[str]:
    yield settings.SECRET_KEY
    # Django's own rotation setting: a message signed just before SECRET_KEY changed
    # still holds while the old key is listed there.
    yield from getattr(settings, "SECRET_KEY_FALLBACKS", ())


def refusal(name: str, args: Any, kwargs: Any) -> str | None:
    """Why a message of task `name` with these (decoded) arguments carries no valid proof, or None when it does.

    `args` must be a list and `kwargs` a dict, as a JSON message's body holds
    them; the proof is checked against SECRET_KEY, then SECRET_KEY_FALLBACKS,
    in constant time.
    """
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "the arguments are not a list and a mapping"
    given = kwargs.get(PROOF)
    if given is None:
        return "no proof of origin"
    if not isinstance(given, str):
        return "a proof of origin that is not a string"
    try:
        text = _canonical(name, args, kwargs)
    except NotJSON:
        return "arguments that are not plain JSON"
    if any(constant_time_compare(given, _digest(text, key)) for key in _keys()):
        return None
    return "a proof of origin that does not match the message"
