"""The controller's signature on what a device receives (docs/protocol.md §1.15), checked as a device does,
written from the text alone: the canonical JSON (RFC 8785), the signed header bytes, Ed25519 with the
controller's public key, and the sliding anti-replay window over sequence numbers.

Pure apart from the Ed25519 arithmetic: no network, no clock (the caller passes the time).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_sim import wire

ALGORITHM: Final = "ed25519"
DOMAIN_LINE: Final = "wardcast-signed-document-v1"
# §1.15.4: seqs more than this far below the highest one accepted are refused outright.
REPLAY_WINDOW: Final = 1 << 20
# §1.15.4: at most this many accepted seqs are remembered inside the window; past it the oldest are
# forgotten and the floor rises above them, so memory stays bounded and nothing forgotten is accepted.
REPLAY_MEMORY: Final = 4096

# Reason codes (§1.15.5), in the order a device checks.
NO_KEY: Final = "no_key"
UNSIGNED: Final = "unsigned"
MALFORMED_SIGNATURE: Final = "malformed_signature"
UNKNOWN_KEY: Final = "unknown_key"
BAD_SIGNATURE: Final = "bad_signature"
PAYLOAD_MISMATCH: Final = "payload_mismatch"
HEADER_MISMATCH: Final = "header_mismatch"
WRONG_TARGET: Final = "wrong_target"
EXPIRED: Final = "expired"
REPLAYED: Final = "replayed"

_SIGNATURE_BYTES: Final = 64
_PUBLIC_KEY_BYTES: Final = 32
_KEY_ID_HEX: Final = 16
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_MAX_SAFE_INTEGER: Final = 2**53 - 1
_TEXT_MEMBERS: Final = ("alg", "kid", "doc", "id", "target", "issued_at", "expires_at", "payload_sha256")


class SignatureRejectedError(ValueError):
    """A message that fails one of the checks of §1.15.5; `reason` is its code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class CommandKeyError(ValueError):
    """Text or a file that is not an Ed25519 public key."""


@dataclass(frozen=True, slots=True)
class CommandKey:
    """The controller's public key, as a device holds it after provisioning."""

    raw: bytes
    key_id: str = field(init=False)
    _key: Ed25519PublicKey = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != _PUBLIC_KEY_BYTES:
            raise CommandKeyError(f"an Ed25519 public key is 32 bytes, not {len(self.raw)}")
        object.__setattr__(self, "key_id", hashlib.sha256(self.raw).hexdigest()[:_KEY_ID_HEX])
        object.__setattr__(self, "_key", Ed25519PublicKey.from_public_bytes(self.raw))

    @classmethod
    def from_text(cls, text: str) -> CommandKey:
        """The base64 of the raw 32-byte key (what `wardcast command-key show` prints), or a PEM
        SubjectPublicKeyInfo (`--format pem`)."""
        text = text.strip()
        if text.startswith("-----BEGIN"):
            try:
                key = serialization.load_pem_public_key(text.encode())
            except (ValueError, UnsupportedAlgorithm) as error:
                raise CommandKeyError(f"not a PEM public key: {error}") from error
            if not isinstance(key, Ed25519PublicKey):
                raise CommandKeyError(f"the PEM holds a {type(key).__name__}, not an Ed25519 key")
            return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error as error:
            raise CommandKeyError(f"not base64: {error}") from error
        return cls(raw)

    @classmethod
    def from_file(cls, path: Path) -> CommandKey:
        try:
            return cls.from_text(path.read_text())
        except OSError as error:
            raise CommandKeyError(f"cannot read {path}: {error}") from error

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Verified:
    """The header of a signature that verified: what the device checks next (target, expiry, seq)."""

    document: str
    id: str
    target_kind: str
    target: str
    issued_at: datetime
    expires_at: datetime
    seq: int


def verify(document: Mapping[str, Any], key: CommandKey | None, *, document_kind: str) -> Verified:
    """Checks the `sig` of a received document (§1.15.5 steps 1-6); raises `SignatureRejectedError`."""
    if key is None:
        raise SignatureRejectedError(NO_KEY, "this device holds no controller key, so it accepts nothing")
    block = document.get("sig")
    if block is None:
        raise SignatureRejectedError(UNSIGNED, "the document has no sig member")
    header = _header(block)
    if header["kid"] != key.key_id:
        raise SignatureRejectedError(
            UNKNOWN_KEY, f"signed with key {header['kid']}, this device trusts {key.key_id}"
        )
    signature = _signature_bytes(block.get("value"))
    if not key.verify(signature, signed_bytes(header)):
        raise SignatureRejectedError(BAD_SIGNATURE, "the Ed25519 signature does not verify")
    unsigned = {name: value for name, value in document.items() if name != "sig"}
    try:
        digest = hashlib.sha256(canonical_json(unsigned).encode()).hexdigest()
    except ValueError as error:
        raise SignatureRejectedError(
            PAYLOAD_MISMATCH, f"the document has no canonical form: {error}"
        ) from error
    if digest != header["payload_sha256"]:
        raise SignatureRejectedError(PAYLOAD_MISMATCH, "the document is not the one that was signed")
    verified = _verified(header)
    _check_header_matches(verified, document, document_kind)
    return verified


def require_target(verified: Verified, kind: str, name: str) -> None:
    """§1.15.5 step 7: the signature names this device (or the area whose topic it came on)."""
    if (verified.target_kind, verified.target) != (kind, name):
        raise SignatureRejectedError(
            WRONG_TARGET, f"signed for {verified.target_kind}:{verified.target}, received as {kind}:{name}"
        )


def signed_bytes(header: Mapping[str, Any]) -> bytes:
    """§1.15.2: the domain line, then `name=value` lines in this order, each ending in LF."""
    names = ("alg", "kid", "doc", "id", "target", "issued_at", "expires_at", "seq", "payload_sha256")
    lines = [DOMAIN_LINE, *(f"{name}={header[name]}" for name in names)]
    return "".join(line + "\n" for line in lines).encode()


def _header(block: object) -> dict[str, Any]:
    if not isinstance(block, dict):
        raise SignatureRejectedError(MALFORMED_SIGNATURE, "sig is not a JSON object")
    header: dict[str, Any] = {}
    for name in _TEXT_MEMBERS:
        value = block.get(name)
        if not isinstance(value, str) or not value or any(ord(c) < 0x20 for c in value):  # noqa: PLR2004
            raise SignatureRejectedError(
                MALFORMED_SIGNATURE, f"sig.{name} is not a non-empty single-line string"
            )
        header[name] = value
    if header["alg"] != ALGORITHM:
        raise SignatureRejectedError(MALFORMED_SIGNATURE, f"sig.alg {header['alg']!r} is not {ALGORITHM!r}")
    seq = block.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= _MAX_SAFE_INTEGER:
        raise SignatureRejectedError(MALFORMED_SIGNATURE, "sig.seq is not an integer within 0..2^53-1")
    header["seq"] = seq
    if _SHA256_HEX.fullmatch(header["payload_sha256"]) is None:
        raise SignatureRejectedError(MALFORMED_SIGNATURE, "sig.payload_sha256 is not 64 lowercase hex digits")
    return header


def _signature_bytes(value: object) -> bytes:
    if not isinstance(value, str):
        raise SignatureRejectedError(MALFORMED_SIGNATURE, "sig.value is not a string")
    try:
        signature = base64.b64decode(value, validate=True)
    except binascii.Error as error:
        raise SignatureRejectedError(MALFORMED_SIGNATURE, f"sig.value is not base64: {error}") from error
    # Only the one canonical spelling: base64 leaves spare bits in the last character, and a text that
    # decodes to the same bytes must not count as another, valid, message.
    if len(signature) != _SIGNATURE_BYTES or base64.b64encode(signature).decode() != value:
        raise SignatureRejectedError(MALFORMED_SIGNATURE, "sig.value is not the base64 of 64 bytes")
    return signature


def _verified(header: Mapping[str, Any]) -> Verified:
    kind, _, name = str(header["target"]).partition(":")
    if kind not in {"device", "area"} or not name:
        raise SignatureRejectedError(
            HEADER_MISMATCH, f"sig.target {header['target']!r} is not device:… or area:…"
        )
    try:
        issued_at = wire.parse_timestamp(header["issued_at"])
        expires_at = wire.parse_timestamp(header["expires_at"])
    except ValueError as error:
        raise SignatureRejectedError(HEADER_MISMATCH, f"sig: {error}") from error
    return Verified(header["doc"], header["id"], kind, name, issued_at, expires_at, header["seq"])


def _check_header_matches(verified: Verified, document: Mapping[str, Any], document_kind: str) -> None:
    """§1.15.5 step 6: the header describes this document, in the role it arrived in."""
    if verified.document != document_kind:
        raise SignatureRejectedError(
            HEADER_MISMATCH, f"sig.doc is {verified.document!r}, but this arrived as a {document_kind}"
        )
    if document.get("id") != verified.id:
        raise SignatureRejectedError(HEADER_MISMATCH, "sig.id is not the document's id")
    named = document.get("area") if verified.target_kind == "area" else document.get("device")
    if named != verified.target:
        raise SignatureRejectedError(HEADER_MISMATCH, "sig.target is not the document's device or area")
    if document_kind == "command":
        signed = (
            wire.format_timestamp(verified.issued_at),
            wire.format_timestamp(verified.expires_at),
            verified.seq,
        )
        carried = document.get("issued_at"), document.get("expires_at"), document.get("seq")
        if not _same_instants_and_seq(signed, carried):
            raise SignatureRejectedError(
                HEADER_MISMATCH, "sig issued_at/expires_at/seq differ from the command's"
            )


def _same_instants_and_seq(signed: tuple[str, str, int], carried: tuple[object, object, object]) -> bool:
    issued, expires, seq = carried
    if not isinstance(issued, str) or not isinstance(expires, str) or type(seq) is not int:
        return False
    try:
        return (
            wire.format_timestamp(wire.parse_timestamp(issued)),
            wire.format_timestamp(wire.parse_timestamp(expires)),
            seq,
        ) == signed
    except ValueError:
        return False


# -- the sliding anti-replay window (§1.15.4) --------------------------------------------------------


class ReplayWindow:
    """Which seqs a device has accepted, as IPsec's anti-replay window (RFC 4303 §3.4.3) keeps them:
    anything at or below the floor (the highest accepted minus the window, raised past forgotten seqs)
    is refused; above it, a seq is accepted once. Seqs are sparse on one device (the controller numbers
    every document it signs, for all devices), so the seen ones are a set, not IPsec's bitmap."""

    def __init__(self, size: int = REPLAY_WINDOW, memory: int = REPLAY_MEMORY) -> None:
        if size < 1 or memory < 1:
            raise ValueError("size and memory must be at least 1")
        self._size = size
        self._memory = memory
        self._highest = -1
        self._forgotten_up_to = -1
        self._seen: set[int] = set()

    @property
    def floor(self) -> int:
        """Every seq at or below this is refused."""
        return max(self._highest - self._size, self._forgotten_up_to)

    def admit(self, seq: int) -> None:
        """Accepts `seq` once; raises `SignatureRejectedError(REPLAYED)` if it was seen or is too old."""
        if seq <= self.floor:
            raise SignatureRejectedError(
                REPLAYED, f"seq {seq} is at or below this device's window floor {self.floor}"
            )
        if seq in self._seen:
            raise SignatureRejectedError(REPLAYED, f"seq {seq} was accepted before")
        self._seen.add(seq)
        if seq > self._highest:
            self._highest = seq
            floor = self.floor
            if min(self._seen) <= floor:
                self._seen = {kept for kept in self._seen if kept > floor}
        if len(self._seen) > self._memory:
            oldest = min(self._seen)
            self._seen.discard(oldest)
            self._forgotten_up_to = oldest


# -- RFC 8785 canonical JSON (§1.15.3) ---------------------------------------------------------------


def canonical_json(value: object) -> str:
    """The JSON Canonicalization Scheme (RFC 8785): names sorted by UTF-16 code units, no whitespace,
    minimal string escapes, numbers as ECMAScript's Number::toString. Raises `ValueError` for what has
    no canonical form (NaN, infinity)."""
    if isinstance(value, dict):
        ordered = sorted(value.items(), key=lambda item: item[0].encode("utf-16-be"))
        return "{" + ",".join(f"{_string(name)}:{canonical_json(item)}" for name, item in ordered) + "}"
    if isinstance(value, list):
        return "[" + ",".join(canonical_json(item) for item in value) + "]"
    if isinstance(value, str):
        return _string(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return _number(float(value)) if abs(value) > _MAX_SAFE_INTEGER else str(value)
    if isinstance(value, float):
        return _number(value)
    raise ValueError(f"{type(value).__name__} is not a JSON value")


def _string(text: str) -> str:
    # json.dumps without ASCII escaping writes exactly RFC 8785's escapes: \" \\ \b \f \n \r \t and
    # \u00xx (lowercase) for the other control characters, everything else as itself.
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    """ECMAScript Number::toString (ECMA-262 §6.1.6.1.20) of a finite double."""
    if not math.isfinite(value):
        raise ValueError(f"{value} has no JSON form")
    if value == 0:
        return "0"
    if value < 0:
        return "-" + _number(-value)
    # repr gives the shortest digits that read back as the same double, as ECMAScript requires;
    # value = digits × 10^exponent, then with the point placed `point` digits from the left.
    _, digit_tuple, exponent = Decimal(repr(value)).as_tuple()
    assert isinstance(exponent, int)  # noqa: S101 - a finite value has an integer exponent
    digits = "".join(str(digit) for digit in digit_tuple).lstrip("0")
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    digits = stripped
    count = len(digits)
    point = exponent + count
    if count <= point <= 21:  # noqa: PLR2004 - the thresholds are ECMAScript's
        return digits + "0" * (point - count)
    if 0 < point <= 21:  # noqa: PLR2004
        return digits[:point] + "." + digits[point:]
    if -6 < point <= 0:  # noqa: PLR2004
        return "0." + "0" * -point + digits
    sign = "+" if point - 1 >= 0 else "-"
    shown = digits[0] + ("." + digits[1:] if count > 1 else "")
    return f"{shown}e{sign}{abs(point - 1)}"
