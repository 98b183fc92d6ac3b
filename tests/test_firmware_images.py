"""Firmware image uploads (issue 6): signed by a trusted key or refused, naming the field; nothing
half-stored; the image served to a rollout's devices only with the rollout's token, with Range."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.support.firmware import SigningKey, make_image, upload_image
from tests.support.system import ControllerHandle

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _stored_files(controller: ControllerHandle) -> list[Path]:
    root = controller.workdir / "firmware"
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def test_a_signed_image_is_stored_and_bad_ones_are_refused_naming_the_field(
    firmware_controller: ControllerHandle, signing_key: SigningKey
):
    image = make_image("2.0.0")
    tampered = bytearray(image)
    tampered[1000] ^= 0x01
    stranger = SigningKey(Ed25519PrivateKey.generate())
    cases = [
        ({"signature": None}, 422, "signature", "unsigned"),
        ({"signature": signing_key.sign(image), "image": bytes(tampered)}, 422, "signature", "tampered"),
        ({"signature": stranger.sign(image)}, 422, "signature", "tampered"),
        ({"signature": "not base64!"}, 422, "signature", "base64"),
        ({"signature": signing_key.sign(image), "sha256": "0" * 64}, 422, "sha256", "not the"),
        ({"signature": signing_key.sign(image), "kind": "toaster"}, 422, "kind", "not one of"),
        ({"signature": signing_key.sign(image), "version": "../etc"}, 422, "version", "letters"),
        (
            {"signature": signing_key.sign(big := make_image("big", 1_100_000)), "image": big},
            413,
            "file",
            "limit",
        ),
    ]
    with firmware_controller.client() as client:
        for overrides, status, field, words in cases:
            body = overrides.get("image", image)
            response = upload_image(
                client,
                body,  # type: ignore[arg-type]
                version=str(overrides.get("version", "2.0.0")),
                signature=overrides["signature"],  # type: ignore[arg-type]
                kind=str(overrides.get("kind", "speaker")),
                sha256=overrides.get("sha256"),  # type: ignore[arg-type]
            )
            assert response.status_code == status, (overrides.keys(), response.text)
            assert response.json()["field"] == field, response.text
            assert words in response.json()["detail"], response.text
        assert _stored_files(firmware_controller) == [], "a refused upload left a file behind"
        assert client.get("/api/v1/firmware").json() == []

        stored = upload_image(
            client,
            image,
            version="2.0.0",
            signature=signing_key.sign(image),
            sha256=hashlib.sha256(image).hexdigest(),
        )
        assert stored.status_code == 201, stored.text
        assert stored.json()["sha256"] == hashlib.sha256(image).hexdigest()
        assert stored.json()["size_bytes"] == len(image)

        again = upload_image(
            client, make_image("x"), version="2.0.0", signature=signing_key.sign(make_image("x"))
        )
        assert again.status_code == 409
        assert again.json()["field"] == "version"
        same_bytes = upload_image(client, image, version="2.0.1", signature=signing_key.sign(image))
        assert same_bytes.status_code == 409
        assert same_bytes.json()["field"] == "file"
        assert [path.name for path in _stored_files(firmware_controller)] == [
            hashlib.sha256(image).hexdigest()
        ]

        operator = firmware_controller.api_key("operator")
        with firmware_controller.client(operator) as operator_client:
            refused = upload_image(
                operator_client, make_image("3"), version="3.0.0", signature=signing_key.sign(make_image("3"))
            )
        assert refused.status_code == 403
        audit = client.get("/api/v1/audit", params={"action": "firmware.upload"}).json()
        assert [entry["subject"] for entry in audit] == [stored.json()["id"]]


def test_the_cli_makes_a_key_signs_and_uploads(
    firmware_controller: ControllerHandle, signing_key: SigningKey, tmp_path: Path
):
    image_path = tmp_path / "fw.bin"
    image_path.write_bytes(make_image("cli"))

    new_key = tmp_path / "new.pem"
    made = firmware_controller.cli("firmware", "keygen", "--out", str(new_key))
    assert made.returncode == 0, made.stderr
    public_key = made.stdout.strip().splitlines()[-1]
    assert new_key.stat().st_mode & 0o777 == 0o600
    signed = firmware_controller.cli("firmware", "sign", str(image_path), "--key", str(new_key))
    assert signed.returncode == 0, signed.stderr
    # What a device does with the key keygen printed.
    Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key)).verify(
        base64.b64decode(signed.stdout.strip()), hashlib.sha256(image_path.read_bytes()).digest()
    )
    api = ("--api", firmware_controller.base_url, "--token", firmware_controller.token)
    untrusted = firmware_controller.cli(
        "firmware", "upload", str(image_path), "--version", "9.0", "--signature", signed.stdout.strip(), *api
    )
    assert untrusted.returncode == 1
    assert "signature" in untrusted.stderr

    trusted_key = tmp_path / "trusted.pem"
    trusted_key.write_bytes(
        signing_key.private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    signature = firmware_controller.cli("firmware", "sign", str(image_path), "--key", str(trusted_key))
    uploaded = firmware_controller.cli(
        "firmware",
        "upload",
        str(image_path),
        "--version",
        "9.0",
        "--signature",
        signature.stdout.strip(),
        *api,
    )
    assert uploaded.returncode == 0, uploaded.stderr
    listed = firmware_controller.cli("firmware", "list", *api)
    assert "9.0" in listed.stdout
