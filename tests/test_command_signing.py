"""Signed commands (docs/protocol.md §1.15) without a broker: the canonical bytes, the controller's signer,
the simulator's independent verifier, the anti-replay window, the key file and the signing sequence."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from controller.domain.command_signing import (
    SignatureHeader,
    Target,
    UnsignableDocumentError,
    canonical_payload,
    payload_sha256,
)
from controller.services.command_signing import (
    CommandSigner,
    CountingSequence,
    ReservedSequence,
    SigningKeyError,
    load_or_create_signing_key,
    reserve_sequence_block,
)
from controller.store.db import create_db_engine, migrate
from firmware_sim import signature, wire
from firmware_sim.signature import CommandKey, ReplayWindow, SignatureRejectedError

# RFC 8032 §7.1, test 1: a fixed key makes the golden signature below reproducible (Ed25519 is
# deterministic), so both implementations are pinned to the same bytes, not merely to each other.
GOLDEN_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
GOLDEN_KEY = Ed25519PrivateKey.from_private_bytes(GOLDEN_SEED)
GOLDEN_PUBLIC = CommandKey(bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"))

COMMAND: dict[str, Any] = {
    "v": 1,
    "type": "play",
    "id": "0b0e6c2a-5d1b-4f5e-9a51-2f3c1c1e9a10",
    "correlation_id": "5f0d4c59-6a44-4b53-8a3e-6b7f1d2f3a01",
    "device": "spk-001",
    "issued_at": "2026-11-24T06:00:00Z",
    "expires_at": "2026-11-24T07:00:00Z",
    "seq": 0,
    "broadcast_id": "b-1",
    "priority": {"class": "emergency", "sub": 10, "rank": 522},
    "mode": "live",
    "media": {
        "url": "http://controller/media/ab",
        "sha256": "ab" * 32,
        "duration_s": 12.5,
        "content_type": "audio/wav",
    },
    "repeats": 2,
    "max_duration_s": 600.0,
    "text": 'Cảnh báo lũ: "khẩn"\n',
}
GOLDEN_CANONICAL = (
    '{"broadcast_id":"b-1","correlation_id":"5f0d4c59-6a44-4b53-8a3e-6b7f1d2f3a01","device":"spk-001",'
    '"expires_at":"2026-11-24T07:00:00Z","id":"0b0e6c2a-5d1b-4f5e-9a51-2f3c1c1e9a10",'
    '"issued_at":"2026-11-24T06:00:00Z","max_duration_s":600,"media":{"content_type":"audio/wav",'
    '"duration_s":12.5,"sha256":"' + "ab" * 32 + '","url":"http://controller/media/ab"},"mode":"live",'
    '"priority":{"class":"emergency","rank":522,"sub":10},"repeats":2,"seq":7,'
    '"text":"Cảnh báo lũ: \\"khẩn\\"\\n","type":"play","v":1}'
)
GOLDEN_SIGNED_BYTES = (
    "wardcast-signed-document-v1\n"
    "alg=ed25519\n"
    "kid=21fe31dfa154a261\n"
    "doc=command\n"
    "id=0b0e6c2a-5d1b-4f5e-9a51-2f3c1c1e9a10\n"
    "target=device:spk-001\n"
    "issued_at=2026-11-24T06:00:00Z\n"
    "expires_at=2026-11-24T07:00:00Z\n"
    "seq=7\n"
    "payload_sha256={digest}\n"
)


def golden_signer(first_seq: int = 7) -> CommandSigner:
    return CommandSigner(GOLDEN_KEY, CountingSequence(first_seq))


def sign(
    document: dict[str, Any], target: Target | None = None, signer: CommandSigner | None = None
) -> dict[str, Any]:
    return asyncio.run(
        (signer or golden_signer()).sign_command(
            document, target or Target("device", str(document["device"]))
        )
    )


def verify(document: dict[str, Any], key: CommandKey = GOLDEN_PUBLIC) -> signature.Verified:
    return signature.verify(document, key, document_kind="command")


def reason_of(document: dict[str, Any], key: CommandKey = GOLDEN_PUBLIC) -> str:
    with pytest.raises(SignatureRejectedError) as refused:
        verify(document, key)
    return refused.value.reason


# -- the exact bytes ---------------------------------------------------------------------------------


def test_the_canonical_payload_and_the_signed_bytes_are_exactly_the_documented_ones() -> None:
    signed = sign(COMMAND)

    canonical = canonical_payload(signed)
    assert canonical.decode() == GOLDEN_CANONICAL
    assert signature.canonical_json({k: v for k, v in signed.items() if k != "sig"}) == GOLDEN_CANONICAL
    digest = payload_sha256(signed)
    header = SignatureHeader(
        key_id=GOLDEN_PUBLIC.key_id,
        document="command",
        id=COMMAND["id"],
        target=Target("device", "spk-001"),
        issued_at=COMMAND["issued_at"],
        expires_at=COMMAND["expires_at"],
        seq=7,
        payload_sha256=digest,
    )
    assert header.signed_bytes().decode() == GOLDEN_SIGNED_BYTES.format(digest=digest)
    assert signature.signed_bytes(signed["sig"]) == header.signed_bytes()
    assert signed["seq"] == signed["sig"]["seq"] == 7
    assert GOLDEN_PUBLIC.verify(base64.b64decode(signed["sig"]["value"]), header.signed_bytes())


def test_numbers_are_written_as_ecmascript_writes_them() -> None:
    # RFC 8785 Appendix B and §3.2.2.3 examples, through the simulator's formatter.
    cases = {
        600.0: "600",
        -0.0: "0",
        0.5: "0.5",
        1e21: "1e+21",
        1e-7: "1e-7",
        0.000001: "0.000001",
        123456789012345680000.0: "123456789012345680000",
        5e-324: "5e-324",
        1.7976931348623157e308: "1.7976931348623157e+308",
        333333333.3333333: "333333333.3333333",
    }
    for value, text in cases.items():
        assert signature.canonical_json(value) == text


def test_the_controller_refuses_what_has_no_single_canonical_form() -> None:
    for bad, member in (
        ({"x": float("nan")}, "x"),
        ({"a": [1, 2**60]}, "a[1]"),
        ({"t": {"tiny": 1e-9}}, "t.tiny"),
    ):
        with pytest.raises(UnsignableDocumentError) as refused:
            canonical_payload(bad)
        assert refused.value.member == member


# -- the controller signs, the simulator verifies --------------------------------------------------


def test_a_signed_command_verifies_with_the_controllers_key_only() -> None:
    signed = sign(COMMAND)
    verified = verify(signed)
    assert (verified.id, verified.target_kind, verified.target, verified.seq) == (
        COMMAND["id"],
        "device",
        "spk-001",
        7,
    )
    assert reason_of(signed, CommandKey(bytes(32))) == "unknown_key"
    # Read back from the wire (floats and all), it still verifies.
    assert verify(json.loads(json.dumps(signed))).seq == 7


def test_each_check_fails_with_its_own_reason() -> None:
    signed = sign(COMMAND)
    unsigned = {k: v for k, v in signed.items() if k != "sig"}
    assert reason_of(unsigned) == "unsigned"
    assert reason_of(signed | {"sig": "nope"}) == "malformed_signature"
    with pytest.raises(SignatureRejectedError) as no_key:
        signature.verify(signed, None, document_kind="command")
    assert no_key.value.reason == "no_key"

    other = Ed25519PrivateKey.generate()
    resigned = sign(COMMAND, signer=CommandSigner(other, CountingSequence(7)))
    assert reason_of(resigned) == "unknown_key"
    forged = copy.deepcopy(resigned)
    forged["sig"]["kid"] = GOLDEN_PUBLIC.key_id  # claims the controller's key, signed with another
    assert reason_of(forged) == "bad_signature"

    tampered = copy.deepcopy(signed)
    tampered["media"]["url"] = "http://attacker/media/ab"
    assert reason_of(tampered) == "payload_mismatch"
    later = copy.deepcopy(signed)
    later["sig"]["seq"] = 8  # the header is signed too
    assert reason_of(later) == "bad_signature"
    # A signature made for a programme is not one for a command.
    with pytest.raises(SignatureRejectedError) as wrong_kind:
        signature.verify(signed, GOLDEN_PUBLIC, document_kind="programme")
    assert wrong_kind.value.reason == "header_mismatch"
    # The last base64 character of a 64-byte value has spare bits: another spelling is refused.
    value = signed["sig"]["value"]
    respelled = copy.deepcopy(signed)
    respelled["sig"]["value"] = value[:-3] + chr(ord(value[-3]) ^ 1) + value[-2:]
    assert reason_of(respelled) in {"malformed_signature", "bad_signature"}

    verified = verify(signed)
    with pytest.raises(SignatureRejectedError) as elsewhere:
        signature.require_target(verified, "device", "spk-002")
    assert elsewhere.value.reason == "wrong_target"


def test_an_area_command_is_signed_for_its_area() -> None:
    area_command = {k: v for k, v in COMMAND.items() if k not in {"device", "correlation_id"}} | {
        "area": "hue"
    }
    signed = sign(area_command, Target("area", "hue"))
    verified = verify(signed)
    signature.require_target(verified, "area", "hue")
    with pytest.raises(SignatureRejectedError) as elsewhere:
        signature.require_target(verified, "area", "tdp-03")
    assert elsewhere.value.reason == "wrong_target"


def test_a_programme_gets_an_id_of_its_own_and_verifies_as_a_programme() -> None:
    document = {
        "v": 1,
        "device": "spk-001",
        "generated_at": "2026-11-24T05:00:00Z",
        "valid_from": "2026-11-24T05:00:00Z",
        "valid_until": "2026-11-26T05:00:00Z",
        "comm_loss": {"policy": "keep"},
        "areas": [],
        "items": [],
    }
    signed = asyncio.run(golden_signer().sign_programme(document))
    verified = signature.verify(signed, GOLDEN_PUBLIC, document_kind="programme")
    assert verified.id == signed["id"]
    assert verified.expires_at == datetime(2026, 11, 26, 5, tzinfo=UTC)
    assert "seq" not in signed  # a programme's seq is its signature's


@given(st.data())
def test_any_single_byte_change_to_the_payload_fails_verification(data: st.DataObject) -> None:
    signed = sign(COMMAND)
    canonical = bytearray(canonical_payload(signed))
    index = data.draw(st.integers(0, len(canonical) - 1), label="index")
    replacement = data.draw(st.integers(0, 255).filter(lambda b: b != canonical[index]), label="byte")
    canonical[index] = replacement
    try:
        changed = wire.load_json(bytes(canonical))
    except ValueError:
        return  # no longer JSON: a device cannot even read it
    if not isinstance(changed, dict):
        return
    with pytest.raises(SignatureRejectedError):
        verify(changed | {"sig": signed["sig"]})


@given(st.data())
def test_any_single_byte_change_to_a_signed_field_fails_verification(data: st.DataObject) -> None:
    signed = sign(COMMAND)
    header = signed["sig"]
    name = data.draw(
        st.sampled_from(["kid", "doc", "id", "target", "issued_at", "expires_at", "seq", "payload_sha256"]),
        label="field",
    )
    text = bytearray(str(header[name]).encode())
    index = data.draw(st.integers(0, len(text) - 1), label="index")
    text[index] = data.draw(st.integers(0, 255).filter(lambda b: b != text[index]), label="byte")
    try:
        changed_text = text.decode()
    except UnicodeDecodeError:
        return  # not a string a JSON document could carry
    changed: object = changed_text
    if name == "seq":
        if not changed_text.isascii() or not changed_text.isdigit():
            return  # not an integer: refused as malformed (checked above)
        changed = int(changed_text)
    forged = copy.deepcopy(signed)
    forged["sig"][name] = changed
    with pytest.raises(SignatureRejectedError):
        verify(forged)


# -- the anti-replay window --------------------------------------------------------------------------


def test_the_window_accepts_each_seq_once_in_any_order_and_refuses_what_fell_below_it() -> None:
    window = ReplayWindow(size=100, memory=1000)
    for seq in (10, 5, 50, 7):  # out of order across the device and area topics: all new
        window.admit(seq)
    for seq in (10, 5, 50, 7):
        with pytest.raises(SignatureRejectedError, match="accepted before"):
            window.admit(seq)
    window.admit(200)  # the floor is now 100
    window.admit(150)
    with pytest.raises(SignatureRejectedError, match="window floor"):
        window.admit(99)


def test_the_window_forgets_the_oldest_past_its_memory_and_raises_its_floor() -> None:
    window = ReplayWindow(size=1_000_000, memory=3)
    for seq in (1, 2, 3, 4):
        window.admit(seq)
    assert window.floor == 1  # 1 was forgotten: it can never be accepted again
    with pytest.raises(SignatureRejectedError):
        window.admit(1)
    window.admit(10)


# -- the key file and the sequence -----------------------------------------------------------------


def test_the_key_is_generated_once_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "command-signing.key"
    first = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_or_create_signing_key(path)
    assert first.private_bytes_raw() == second.private_bytes_raw()
    assert [p.name for p in path.parent.iterdir()] == ["command-signing.key"]


def test_a_key_others_can_read_or_a_wrong_file_is_refused_naming_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "command-signing.key"
    load_or_create_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(SigningKeyError, match=r"signing.key_file: .*chmod 600"):
        load_or_create_signing_key(path)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(SigningKeyError, match=r"signing.key_file: .*not an unencrypted PEM private key"):
        load_or_create_signing_key(garbage)


def test_the_sequence_stays_monotonic_across_restarts(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'seq.db'}")
    try:
        migrate(engine)

        async def take(count: int) -> list[int]:
            sequence = ReservedSequence(lambda size: reserve_sequence_block(engine, size), block=10)
            return [await sequence.next() for _ in range(count)]

        first_run = asyncio.run(take(15))
        second_run = asyncio.run(take(3))  # a restart: the unused rest of the block is skipped
    finally:
        engine.dispose()
    assert first_run == list(range(1, 16))
    assert second_run == [21, 22, 23]


def test_a_command_signed_twice_gets_a_new_seq_each_time() -> None:
    signer = golden_signer(first_seq=1)
    first = sign(COMMAND, signer=signer)
    again = sign(COMMAND, signer=signer)
    assert (first["seq"], again["seq"]) == (1, 2)
    window = ReplayWindow()
    window.admit(verify(first).seq)
    window.admit(verify(again).seq)


def test_an_expired_window_is_not_a_signature_problem() -> None:
    # Expiry is judged by the device on `expires_at` (reported `expired`, §1.9), not by the signature.
    past = COMMAND | {
        "issued_at": "2020-01-01T00:00:00Z",
        "expires_at": (datetime(2020, 1, 1, tzinfo=UTC) + timedelta(minutes=5)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
    }
    assert verify(sign(past)).expires_at == datetime(2020, 1, 1, 0, 5, tzinfo=UTC)
