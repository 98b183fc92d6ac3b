"""Provisioning without a broker: CSV rows checked one by one, factory secrets, the claim's proof and its
window, the bundle and its QR code (a SQLite database and a clock the test moves)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from controller.broker import mosquitto_password_matches
from controller.domain.areas import Area, AreaTree
from controller.domain.provisioning import bundle_qr_png, provisioning_bundle
from controller.services.auth import Principal, Role
from controller.services.errors import ServiceError
from controller.services.provisioning import BrokerAccess, BrokerEndpoint, ProvisioningService
from controller.store.db import create_db_engine, migrate
from controller.store.models import AreaRow, ClaimRow, DeviceRow, FactorySecretRow
from firmware_sim.claim import ClaimDevice, ClaimRefusedError

START = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)
ADMIN = Principal(key_id="k-admin", name="admin", role=Role.ADMIN, ward_code=None)
TECHNICIAN_A = Principal(
    key_id="k-tech", name="tech", role=Role.TECHNICIAN, ward_code=None, wards=frozenset({"hn.a"})
)
AREAS = [
    Area(code="hn", name="Thành phố", kind="city"),
    Area(code="hn.a", name="Phường An", kind="ward", parent_code="hn"),
    Area(code="hn.a.t1", name="Tổ 1", kind="group", parent_code="hn.a"),
    Area(code="hn.b", name="Xã Bình", kind="commune", parent_code="hn"),
    Area(code="hn.b.t1", name="Thôn 1", kind="group", parent_code="hn.b"),
]


@dataclass
class MovableClock:
    moment: datetime = START

    def now(self) -> datetime:
        return self.moment


@dataclass
class Bench:
    service: ProvisioningService
    clock: MovableClock
    tree: AreaTree
    engine: object

    def devices(self) -> list[DeviceRow]:
        with Session(self.engine) as session:  # type: ignore[arg-type]
            return list(session.exec(select(DeviceRow)).all())

    def claims(self) -> list[ClaimRow]:
        with Session(self.engine) as session:  # type: ignore[arg-type]
            return list(session.exec(select(ClaimRow)).all())


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'p.db'}")
    migrate(engine)
    with Session(engine) as session:
        for area in AREAS:
            session.add(AreaRow(code=area.code, name=area.name, kind=area.kind, parent_code=area.parent_code))
        session.commit()
    clock = MovableClock()
    service = ProvisioningService(
        engine,
        clock,
        broker=BrokerEndpoint("broker.example", 8883),
        reserved_usernames=["controller", "wardcast.simulator"],
        claim_window_s=600,
        claim_clock_skew_s=300,
    )
    try:
        yield Bench(service, clock, AreaTree(AREAS), engine)
    finally:
        engine.dispose()


CSV = b"""kind,area,id,serial,lat,lon,name
speaker,hn.a.t1,spk-1,SN-1,22.1,105.8,Loa 1
speaker,hn.a.t1,spk-2,SN-2,,,
siren,hn.a.t1,spk-3,SN-3,,,
speaker,nowhere,spk-4,SN-4,,,
speaker,hn.a.t1,spk-5,SN-1,,,
speaker,hn.a.t1,spk-1,SN-6,,,
led_screen,hn.a.t1,led-7,SN-7,91,,
sensor,hn.b.t1,sen-8,,,,
speaker,hn.a.t1,controller,SN-9,,,
"""


def test_an_import_creates_the_good_rows_and_names_each_bad_one(bench: Bench):
    report = bench.service.import_devices(CSV, ADMIN, bench.tree, atomic=False)
    assert [row.id for row in report.created] == ["spk-1", "spk-2", "sen-8"]
    assert [(p.row, p.field) for p in report.rejected] == [
        (4, "kind"),
        (5, "area"),
        (6, "serial"),
        (7, "id"),
        (7, "address"),  # the address defaults to the id
        (8, "lat"),
        (10, "address"),
    ]
    assert "row 2" in report.rejected[2].detail  # the duplicate serial names the row it repeats
    bundle = report.bundles[0]
    assert bundle["username"] == bundle["address"] == "spk-1"
    assert bundle["broker_host"] == "broker.example" and bundle["broker_port"] == 8883
    assert "command_key" not in bundle  # none configured: the field is left out
    stored = {row.id: row for row in bench.devices()}
    assert mosquitto_password_matches(bundle["password"], stored["spk-1"].broker_password_hash or "")
    assert bundle["password"] not in json.dumps([r.model_dump(mode="json") for r in stored.values()])


def test_an_atomic_import_with_one_bad_row_stores_nothing(bench: Bench):
    with pytest.raises(ServiceError) as refused:
        bench.service.import_devices(CSV, ADMIN, bench.tree, atomic=True)
    assert refused.value.field == "row 4: kind"
    assert len(refused.value.extra["rejected"]) == 7
    assert bench.devices() == []


def test_an_import_clashing_with_the_database_names_the_row(bench: Bench):
    bench.service.import_devices(
        b"kind,area,id,serial\nspeaker,hn.a.t1,spk-1,SN-1\n", ADMIN, bench.tree, atomic=True
    )
    again = b"kind,area,id,serial,address\nspeaker,hn.a.t1,spk-9,SN-1,\nspeaker,hn.a.t1,spk-10,,spk-1\n"
    report = bench.service.import_devices(again, ADMIN, bench.tree, atomic=False)
    assert [(p.row, p.field) for p in report.rejected] == [(2, "serial"), (3, "address")]


def test_a_technician_imports_only_into_its_wards(bench: Bench):
    report = bench.service.import_devices(CSV, TECHNICIAN_A, bench.tree, atomic=False)
    assert [row.id for row in report.created] == ["spk-1", "spk-2"]
    outside = [p for p in report.rejected if p.row == 9]
    assert outside and outside[0].field == "area" and "hn.a" in outside[0].detail


@pytest.mark.parametrize(
    ("csv", "field"),
    [(b"\xff\xfe", "file"), (b"area,id\nhn,x\n", "header"), (b'kind,area\n"speaker,hn\n', "file")],
)
def test_an_unusable_file_names_what_is_wrong(bench: Bench, csv: bytes, field: str):
    with pytest.raises(ServiceError) as refused:
        bench.service.import_devices(csv, ADMIN, bench.tree, atomic=False)
    assert refused.value.field == field


def test_reissue_rotates_and_decommission_revokes_keeping_history(bench: Bench):
    report = bench.service.import_devices(
        b"kind,area,id\nspeaker,hn.a.t1,spk-1\n", ADMIN, bench.tree, atomic=True
    )
    old = report.bundles[0]["password"]
    (fresh,) = bench.service.reissue(["spk-1"], ADMIN, bench.tree)
    (row,) = bench.devices()
    assert not mosquitto_password_matches(old, row.broker_password_hash or "")
    assert mosquitto_password_matches(fresh["password"], row.broker_password_hash or "")
    access = BrokerAccess(bench.engine, None)  # type: ignore[arg-type]
    assert set(access.device_hashes()) == {"spk-1"}
    bench.service.decommission("spk-1", ADMIN, bench.tree)
    (row,) = bench.devices()
    assert row.decommissioned_at == START and not row.enabled and row.broker_password_hash is None
    assert access.device_hashes() == {}
    with pytest.raises(ServiceError) as refused:
        bench.service.reissue(["spk-1"], ADMIN, bench.tree)
    assert refused.value.status == 409


def test_a_technician_cannot_touch_devices_outside_its_wards(bench: Bench):
    bench.service.import_devices(b"kind,area,id\nspeaker,hn.b.t1,spk-b\n", ADMIN, bench.tree, atomic=True)
    with pytest.raises(ServiceError) as refused:
        bench.service.decommission("spk-b", TECHNICIAN_A, bench.tree)
    assert refused.value.status == 404
    assert bench.devices()[0].decommissioned_at is None


# -- factory secrets and claims -----------------------------------------------------------------


def _register(bench: Bench, serial: str = "SN-100") -> bytes:
    secret = secrets.token_bytes(32)
    registered, problems = bench.service.register_factory_secrets(
        f"serial,factory_secret\n{serial},{secret.hex()}\n".encode(), atomic=True
    )
    assert (registered, problems) == (1, [])
    return secret


def _at(bench: Bench) -> str:
    return bench.clock.now().isoformat().replace("+00:00", "Z")


def _ask(bench: Bench, device: ClaimDevice, nonce: str | None = None) -> tuple[str, dict[str, object]]:
    nonce = nonce or secrets.token_hex(16)
    request = device.request(nonce, _at(bench))
    return nonce, bench.service.handle_claim_request(device.serial, json.dumps(request).encode())


def test_factory_secrets_are_checked_row_by_row_and_only_derived_keys_are_kept(bench: Bench):
    secret = secrets.token_bytes(16).hex()
    data = f"serial,factory_secret\nSN-1,{secret}\nSN-1,{secret}\nSN/2,{secret}\nSN-3,abc\n".encode()
    with pytest.raises(ServiceError) as refused:
        bench.service.register_factory_secrets(data, atomic=True)
    assert [(r["row"], r["field"]) for r in refused.value.extra["rejected"]] == [
        (3, "serial"),
        (4, "serial"),
        (5, "factory_secret"),
    ]
    registered, _ = bench.service.register_factory_secrets(data, atomic=False)
    assert registered == 1
    with Session(bench.engine) as session:  # type: ignore[arg-type]
        (row,) = session.exec(select(FactorySecretRow)).all()
    assert secret not in (row.auth_key, row.encryption_key)


def test_a_claim_is_approved_into_an_area_and_the_bundle_opens_only_for_the_device(bench: Bench):
    secret = _register(bench)
    device = ClaimDevice(serial="SN-100", factory_secret=secret, kind="speaker")
    nonce, answer = _ask(bench, device)
    assert answer["status"] == "pending" and answer["nonce"] == nonce
    (pending,) = bench.service.pending_claims()
    approved = bench.service.approve_claim(
        pending.id, area="hn.a.t1", device_id=None, name=None, principal=TECHNICIAN_A, tree=bench.tree
    )
    assert approved.device.id == "spk-sn-100" and approved.device.serial == "SN-100"
    bundle = device.open_bundle(nonce, approved.response)
    assert bundle["address"] == "spk-sn-100" and bundle["area"] == "hn.a.t1"
    assert mosquitto_password_matches(bundle["password"], approved.device.broker_password_hash or "")
    impostor = ClaimDevice(serial="SN-100", factory_secret=secrets.token_bytes(32))
    with pytest.raises(ClaimRefusedError):
        impostor.open_bundle(nonce, approved.response)
    with pytest.raises(ClaimRefusedError):
        device.open_bundle(secrets.token_hex(16), approved.response)  # bound to the request's nonce
    # The secret is spent: a second claim is refused, and nothing new is stored.
    _, again = _ask(bench, device)
    assert again["status"] == "refused" and again["field"] == "serial"
    assert bench.service.pending_claims() == []


@pytest.mark.parametrize(
    ("case", "field"),
    [("wrong secret", "mac"), ("unknown serial", "serial"), ("clock far off", "at"), ("replayed", "nonce")],
)
def test_a_bad_claim_request_is_refused_with_a_clear_reason_and_stores_nothing(
    bench: Bench, case: str, field: str
):
    secret = _register(bench)
    device = ClaimDevice(serial="SN-100", factory_secret=secret)
    if case == "wrong secret":
        device = ClaimDevice(serial="SN-100", factory_secret=secrets.token_bytes(32))
    if case == "unknown serial":
        device = ClaimDevice(serial="SN-404", factory_secret=secret)
    stored_before = 0
    nonce = secrets.token_hex(16)
    if case == "replayed":
        _ask(bench, device, nonce)
        stored_before = 1
    if case == "clock far off":
        request = device.request(nonce, (START - timedelta(hours=1)).isoformat().replace("+00:00", "Z"))
        answer = bench.service.handle_claim_request("SN-100", json.dumps(request).encode())
    else:
        _, answer = _ask(bench, device, nonce)
    assert answer["status"] == "refused" and answer["field"] == field, answer
    assert len(bench.claims()) == stored_before


def test_a_claim_approved_after_its_window_is_refused_and_creates_nothing(bench: Bench):
    device = ClaimDevice(serial="SN-100", factory_secret=_register(bench))
    _ask(bench, device)
    (pending,) = bench.service.pending_claims()
    bench.clock.moment = START + timedelta(seconds=601)
    assert bench.service.pending_claims() == []
    with pytest.raises(ServiceError) as refused:
        bench.service.approve_claim(
            pending.id, area="hn.a.t1", device_id=None, name=None, principal=ADMIN, tree=bench.tree
        )
    assert refused.value.status == 410 and "expired" in refused.value.detail
    assert bench.devices() == []


def test_a_technician_approves_only_into_its_wards(bench: Bench):
    device = ClaimDevice(serial="SN-100", factory_secret=_register(bench))
    _ask(bench, device)
    (pending,) = bench.service.pending_claims()
    with pytest.raises(ServiceError) as refused:
        bench.service.approve_claim(
            pending.id, area="hn.b.t1", device_id=None, name=None, principal=TECHNICIAN_A, tree=bench.tree
        )
    assert (refused.value.status, refused.value.field) == (403, "area")
    assert bench.devices() == [] and bench.service.pending_claims() != []


def test_the_bundle_carries_the_command_key_only_when_given_and_renders_as_a_qr_png():
    common = {
        "device_id": "spk-1",
        "kind": "speaker",
        "address": "spk-1",
        "area": "hn.a.t1",
        "broker_host": "h",
        "broker_port": 1883,
        "password": "p" * 32,
    }
    assert "command_key" not in provisioning_bundle(**common)
    assert provisioning_bundle(**common, command_public_key="ed25519:abc")["command_key"] == "ed25519:abc"
    png = bundle_qr_png(provisioning_bundle(**common))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
