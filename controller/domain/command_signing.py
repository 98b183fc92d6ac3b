"""What a signature on a controller-to-device document covers (docs/protocol.md §1.15), as exact bytes.

Pure: no key, no clock, no I/O. The signing service (controller/services/command_signing.py) adds the
key and the sequence; devices implement the same rules from the protocol text alone.

A signature covers a header of newline-separated fields (the document kind, its id, its target, when it
was issued and expires, its sequence number and the SHA-256 of the document's canonical JSON), preceded
by a domain-separation line, so that a signature made for one purpose can never be taken for another.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

SIGNATURE_MEMBER: Final = "sig"
SIGNATURE_ALGORITHM: Final = "ed25519"
# The first line of every signed byte string: a signature made for anything else (another protocol,
# another version of this one) never verifies here.
SIGNATURE_DOMAIN: Final = "wardcast-signed-document-v1"

DocumentKind = Literal["command", "programme"]
TargetKind = Literal["device", "area"]
DOCUMENT_KINDS: Final[frozenset[str]] = frozenset(get_args(DocumentKind))
TARGET_KINDS: Final[frozenset[str]] = frozenset(get_args(TargetKind))

# Integers beyond ±(2^53 - 1) do not survive an IEEE 754 double, which is how most device JSON
# parsers (and RFC 8785) read numbers: such a number could be read back as another value.
_MAX_SAFE_INTEGER: Final = 2**53 - 1
# Between these bounds Python's float repr and ECMAScript's Number::toString (RFC 8785 §3.2.2.3) write
# the same characters; outside them the controller refuses to sign rather than emit a second dialect.
_MIN_PLAIN_FRACTION: Final = 1e-4


class UnsignableDocumentError(ValueError):
    """The document holds something with no single canonical form; `member` is its JSON path."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member}: {reason}")
        self.member = member


@dataclass(frozen=True, slots=True)
class Target:
    """Who a document is for: one device by its address, or every speaker following an area."""

    kind: TargetKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class SignatureHeader:
    """The fields a signature covers, besides the document itself (through `payload_sha256`)."""

    key_id: str
    document: DocumentKind
    id: str
    target: Target
    issued_at: str
    expires_at: str
    seq: int
    payload_sha256: str

    def signed_bytes(self) -> bytes:
        """The exact bytes signed: the domain line, then one `name=value` line per field, each ending
        in LF, UTF-8 (docs/protocol.md §1.15.2)."""
        fields = (
            ("alg", SIGNATURE_ALGORITHM),
            ("kid", self.key_id),
            ("doc", self.document),
            ("id", self.id),
            ("target", str(self.target)),
            ("issued_at", self.issued_at),
            ("expires_at", self.expires_at),
            ("seq", str(self.seq)),
            ("payload_sha256", self.payload_sha256),
        )
        for name, value in fields:
            if not value or any(ord(character) < 0x20 for character in value):  # noqa: PLR2004
                # A line feed in a value could forge another field's line.
                raise UnsignableDocumentError(f"sig.{name}", "must be non-empty, without control characters")
        if self.seq < 0 or self.seq > _MAX_SAFE_INTEGER:
            raise UnsignableDocumentError("sig.seq", f"must be within 0..{_MAX_SAFE_INTEGER}")
        lines = [SIGNATURE_DOMAIN, *(f"{name}={value}" for name, value in fields)]
        return "".join(line + "\n" for line in lines).encode()

    def block(self, signature: str) -> dict[str, Any]:
        """The `sig` member that carries the header and the signature (base64) on the wire."""
        return {
            "alg": SIGNATURE_ALGORITHM,
            "kid": self.key_id,
            "doc": self.document,
            "id": self.id,
            "target": str(self.target),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "seq": self.seq,
            "payload_sha256": self.payload_sha256,
            "value": signature,
        }


def canonical_payload(document: Mapping[str, Any]) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme) of the document without its `sig` member: members
    sorted by name (UTF-16 code units), no whitespace, strings in UTF-8 with only the escapes JSON
    requires, numbers as ECMAScript writes them. Raises `UnsignableDocumentError` for a value with no
    canonical form on this wire (NaN, an integer beyond 2^53, a float written with an exponent)."""
    unsigned = {name: value for name, value in document.items() if name != SIGNATURE_MEMBER}
    canonical = _canonical(unsigned, "")
    return json.dumps(canonical, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def payload_sha256(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_payload(document)).hexdigest()


def _canonical(value: object, path: str) -> object:
    """A copy that `json.dumps` (insertion order kept, compact) writes exactly as RFC 8785 does."""
    if isinstance(value, Mapping):
        for name in value:
            if not isinstance(name, str):
                raise UnsignableDocumentError(path or "(document)", f"member name {name!r} is not a string")
        # UTF-16 code units, as RFC 8785 §3.2.3 orders names (the same as code points for the ASCII
        # names of this wire).
        ordered = sorted(value, key=lambda name: name.encode("utf-16-be"))
        return {name: _canonical(value[name], _join(path, name)) for name in ordered}
    if isinstance(value, list | tuple):
        return [_canonical(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > _MAX_SAFE_INTEGER:
            raise UnsignableDocumentError(path, f"integer {value} is beyond ±(2^53 - 1)")
        return value
    if isinstance(value, float):
        return _canonical_float(value, path)
    raise UnsignableDocumentError(path, f"{type(value).__name__} is not a JSON value")


def _canonical_float(value: float, path: str) -> int | float:
    if not math.isfinite(value):
        raise UnsignableDocumentError(path, f"{value} is not a JSON number")
    if value.is_integer():
        if abs(value) > _MAX_SAFE_INTEGER:
            raise UnsignableDocumentError(path, f"{value} is beyond ±(2^53 - 1)")
        return int(value)  # ECMAScript writes 600.0 as 600 (and -0.0 as 0)
    if abs(value) < _MIN_PLAIN_FRACTION or abs(value) > _MAX_SAFE_INTEGER:
        raise UnsignableDocumentError(path, f"{value!r} would need an exponent")
    return value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
