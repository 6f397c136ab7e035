"""Who may turn a trace on, or read the stored ones.

    gate = Gate(secret=None, sample_rate=0.0)
    gate.decide(scope, header_value)    # TRACE_REQUESTED, TRACE_SAMPLED or None

Without a secret only loopback clients may; with a secret, the ``X-Async-Trace`` value must
equal it (compared in constant time) and the client address does not matter.
Exports: Gate, TRACE_REQUESTED, TRACE_SAMPLED, HEADER.
"""

from __future__ import annotations

import hmac
import ipaddress
import random
import re
from collections.abc import MutableMapping
from functools import lru_cache
from typing import Any, Final

__all__ = ["HEADER", "TRACE_REQUESTED", "TRACE_SAMPLED", "Gate"]

HEADER: Final = b"x-async-trace"
TRACE_REQUESTED: Final = "requested"
TRACE_SAMPLED: Final = "sampled"
MAX_VALUE_LENGTH: Final = 256
_OFF: Final = frozenset({b"", b"0", b"false", b"off", b"no"})
_PRINTABLE: Final = re.compile(rb"[\x20-\x7e]+")


@lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


class Gate:
    def __init__(self, *, secret: str | None, sample_rate: float) -> None:
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise ValueError("secret must be a non-empty string (or None for loopback-only)")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0 and 1, got {sample_rate!r}")
        self._secret = secret.encode() if secret is not None else None
        self._sample_rate = sample_rate

    def allowed(self, scope: MutableMapping[str, Any], value: bytes | None) -> bool:
        """May this client turn tracing on (or read traces) with this header value?"""
        if value is None or not value or len(value) > MAX_VALUE_LENGTH:
            return False
        if self._secret is not None:
            return hmac.compare_digest(value, self._secret)
        if not _PRINTABLE.fullmatch(value) or value.strip().lower() in _OFF:
            return False
        return self._from_loopback(scope)

    def may_read(self, scope: MutableMapping[str, Any], value: bytes | None) -> bool:
        """May this client read stored traces? A browser cannot add headers, so without a
        secret a loopback client needs none."""
        if self._secret is not None:
            return value is not None and hmac.compare_digest(value, self._secret)
        return self._from_loopback(scope)

    @staticmethod
    def _from_loopback(scope: MutableMapping[str, Any]) -> bool:
        client = scope.get("client")
        if not client or not isinstance(client[0], str):
            return False
        return is_loopback(client[0])

    def decide(self, scope: MutableMapping[str, Any], value: bytes | None) -> str | None:
        if value is not None:
            return TRACE_REQUESTED if self.allowed(scope, value) else None
        if self._sample_rate and random.random() < self._sample_rate:
            return TRACE_SAMPLED
        return None
