"""The pure MQTT codec: topics, command encoding and inbound decoding (docs/protocol.md §1)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import CommandReport, DeviceState, MalformedPayload, TelemetryReading
from drivers.mqtt_codec import (
    CONTROLLER_SUBSCRIPTIONS,
    ack_topic,
    command_topic,
    decode_inbound,
    encode_command,
    format_timestamp,
    parse_device_topic,
    parse_timestamp,
    schedule_topic,
)

ACK = "wardcast/v1/dev/spk-1/ack"
STATE = "wardcast/v1/dev/spk-1/state"
TELEMETRY = "wardcast/v1/dev/spk-1/telemetry"


def payload(document: object) -> bytes:
    return json.dumps(document).encode()


def only_malformed(topic: str, raw: bytes) -> MalformedPayload:
    events = decode_inbound(topic, raw)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, MalformedPayload), event
    return event


# -- topics ----------------------------------------------------------------------------------------


def test_topics_follow_the_v1_tree() -> None:
    assert command_topic("spk-1") == "wardcast/v1/dev/spk-1/cmd"
    assert ack_topic("spk-1") == ACK
    assert schedule_topic("phuong_7") == "wardcast/v1/dev/phuong_7/schedule"
    assert CONTROLLER_SUBSCRIPTIONS == (
        "wardcast/v1/dev/+/ack",
        "wardcast/v1/dev/+/state",
        "wardcast/v1/dev/+/telemetry",
    )


@pytest.mark.parametrize("address", ["", "Spk-1", "-spk", "spk/1", "spk+", "spk#", "a" * 65, "loa-đường"])
def test_topic_helpers_refuse_addresses_outside_the_spec(address: str) -> None:
    with pytest.raises(ValueError, match="invalid device address"):
        command_topic(address)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (ACK, ("spk-1", "ack")),
        ("wardcast/v1/dev/x/cmd", ("x", "cmd")),
        ("wardcast/v1/dev/" + "a" * 64 + "/state", ("a" * 64, "state")),
        ("wardcast/v1/dev/spk-1/ack/extra", None),
        ("wardcast/v1/dev/spk-1", None),
        ("wardcast/v1/dev//ack", None),
        ("wardcast/v2/dev/spk-1/ack", None),
        ("wardcast/v1/dev/SPK/ack", None),
        ("wardcast/v1/dev/spk-1/log", None),
        ("other/topic", None),
        ("", None),
    ],
)
def test_parse_device_topic(topic: str, expected: tuple[str, str] | None) -> None:
    assert parse_device_topic(topic) == expected


# -- timestamps --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-24T06:00:00Z", datetime(2026, 11, 24, 6, tzinfo=UTC)),
        ("2026-11-24T06:00:01.5Z", datetime(2026, 11, 24, 6, 0, 1, 500_000, tzinfo=UTC)),
        ("2026-11-24T06:00:00.123456Z", datetime(2026, 11, 24, 6, 0, 0, 123_456, tzinfo=UTC)),
    ],
)
def test_timestamps_parse_to_aware_utc(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed is not None
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-24T06:00:00",
        "2026-11-24T06:00:00+07:00",
        "2026-11-24 06:00:00Z",
        "2026-11-24T06:00:00.1234567Z",
        "2026-02-30T06:00:00Z",
        "2026-11-24T24:00:00Z",
        "２０２６-11-24T06:00:00Z",
        "",
    ],
)
def test_timestamps_outside_the_spec_are_refused(text: str) -> None:
    assert parse_timestamp(text) is None


def test_format_timestamp_round_trips() -> None:
    local = datetime(2026, 11, 24, 13, 0, 1, 500_000, tzinfo=timezone(timedelta(hours=7)))
    assert format_timestamp(local) == "2026-11-24T06:00:01.5Z"
    assert format_timestamp(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00Z"
    assert parse_timestamp(format_timestamp(local)) == local
    with pytest.raises(ValueError, match="aware"):
        format_timestamp(datetime(2026, 1, 1))  # noqa: DTZ001


# -- commands ----------------------------------------------------------------------------------------


def test_encode_command_is_compact_utf8_json() -> None:
    document = {"v": 1, "type": "stop", "id": "c1", "reason": "cancelled", "note": "Phường Bến Nghé"}
    encoded = encode_command(document)
    assert encoded == (
        '{"v":1,"type":"stop","id":"c1","reason":"cancelled","note":"Phường Bến Nghé"}'.encode()
    )
    assert json.loads(encoded) == document


def test_encode_command_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        encode_command({"v": 1, "max_duration_s": float("nan")})
    with pytest.raises(TypeError):
        encode_command({"v": 1, "at": datetime.now(UTC)})


# -- reports -----------------------------------------------------------------------------------------


def report(**overrides: object) -> dict[str, object]:
    document: dict[str, object] = {
        "v": 1,
        "command_id": "cmd-1",
        "correlation_id": "delivery-1",
        "state": "completed",
        "at": "2026-11-24T06:00:01.5Z",
    }
    document.update(overrides)
    return {key: value for key, value in document.items() if value is not None}


def test_report_decodes_with_optional_members() -> None:
    events = decode_inbound(
        ACK, payload(report(played_s=42.5, truncated=True, detail="cut", future_member={"x": 1}))
    )
    assert events == [
        CommandReport(
            address="spk-1",
            command_id="cmd-1",
            correlation_id="delivery-1",
            state="completed",
            at=datetime(2026, 11, 24, 6, 0, 1, 500_000, tzinfo=UTC),
            detail="cut",
            played_s=42.5,
            truncated=True,
        )
    ]


def test_a_refusal_report_carries_the_failed_check_as_reason() -> None:
    (event,) = decode_inbound(
        ACK, payload(report(state="rejected", reason="replayed", detail="seq 7 was accepted before"))
    )
    assert isinstance(event, CommandReport)
    assert (event.state, event.reason, event.detail) == ("rejected", "replayed", "seq 7 was accepted before")
    assert only_malformed(ACK, payload(report(state="rejected", reason=3))).reason.startswith(
        "member `reason`"
    )


def test_minimal_report_has_defaults() -> None:
    (event,) = decode_inbound(ACK, payload(report(state="delivered")))
    assert isinstance(event, CommandReport)
    assert (event.detail, event.played_s, event.truncated) == (None, None, False)


@pytest.mark.parametrize(
    ("overrides", "member"),
    [
        ({"v": 2}, "`v`"),
        ({"v": True}, "`v`"),
        ({"v": "1"}, "`v`"),
        ({"command_id": None}, "`command_id` is missing"),
        ({"command_id": ""}, "`command_id`"),
        ({"correlation_id": 7}, "`correlation_id`"),
        ({"state": "exploded"}, "`state`"),
        ({"at": "yesterday"}, "`at`"),
        ({"at": "2026-11-24T06:00:00+07:00"}, "`at`"),
        ({"played_s": -1}, "`played_s`"),
        ({"played_s": "12"}, "`played_s`"),
        ({"played_s": True}, "`played_s`"),
        ({"truncated": "yes"}, "`truncated`"),
        ({"detail": 5}, "`detail`"),
    ],
)
def test_invalid_report_names_the_member(overrides: dict[str, object], member: str) -> None:
    malformed = only_malformed(ACK, payload(report(**overrides)))
    assert malformed.address == "spk-1"
    assert malformed.topic == ACK
    assert member in malformed.reason


def test_huge_numbers_are_not_numbers() -> None:
    raw = payload(report()).replace(b'"v": 1', b'"v": 1, "played_s": 1e400')
    assert "`played_s`" in only_malformed(ACK, raw).reason


# -- states ------------------------------------------------------------------------------------------


def test_state_keeps_extra_members_as_attributes() -> None:
    document = {
        "v": 1,
        "online": True,
        "at": "2026-11-24T06:00:00Z",
        "kind": "speaker",
        "firmware": "sim-1.0.0",
        "volume": 70,
        "playing": None,
        "rssi_dbm": -71,
    }
    assert decode_inbound(STATE, payload(document)) == [
        DeviceState(
            address="spk-1",
            online=True,
            at=datetime(2026, 11, 24, 6, tzinfo=UTC),
            attributes={
                "kind": "speaker",
                "firmware": "sim-1.0.0",
                "volume": 70,
                "playing": None,
                "rssi_dbm": -71,
            },
        )
    ]


def test_last_will_has_no_timestamp() -> None:
    assert decode_inbound(STATE, b'{"v":1,"online":false,"reason":"will"}') == [
        DeviceState(address="spk-1", online=False, at=None, attributes={"reason": "will"})
    ]


@pytest.mark.parametrize(
    ("document", "member"),
    [
        ({"v": 1}, "`online` is missing"),
        ({"v": 1, "online": "true"}, "`online`"),
        ({"v": 1, "online": True, "at": 1700000000}, "`at`"),
    ],
)
def test_invalid_state_names_the_member(document: dict[str, object], member: str) -> None:
    assert member in only_malformed(STATE, payload(document)).reason


def test_cleared_retained_state_is_reported_not_raised() -> None:
    assert only_malformed(STATE, b"").reason == "empty payload"


# -- telemetry ---------------------------------------------------------------------------------------


def test_telemetry_gives_one_event_per_reading() -> None:
    document = {
        "v": 1,
        "at": "2026-11-24T06:00:00Z",
        "readings": [
            {"metric": "water_level", "value": 1.82, "unit": "m"},
            {"metric": "rain_mm", "value": 12},
        ],
    }
    at = datetime(2026, 11, 24, 6, tzinfo=UTC)
    assert decode_inbound(TELEMETRY, payload(document)) == [
        TelemetryReading(address="spk-1", metric="water_level", value=1.82, unit="m", at=at),
        TelemetryReading(address="spk-1", metric="rain_mm", value=12.0, unit=None, at=at),
    ]


def test_telemetry_without_readings_gives_no_events() -> None:
    assert decode_inbound(TELEMETRY, payload({"v": 1, "at": "2026-11-24T06:00:00Z", "readings": []})) == []


@pytest.mark.parametrize(
    ("readings", "member"),
    [
        (None, "`readings` is missing"),
        ({"metric": "x"}, "`readings`"),
        ([5], "`readings[0]`"),
        ([{"metric": "a", "value": 1}, {"metric": "b", "value": "high"}], "`readings[1].value`"),
        ([{"metric": "", "value": 1}], "`readings[0].metric`"),
        ([{"metric": "a", "value": 1, "unit": 3}], "`readings[0].unit`"),
    ],
)
def test_invalid_telemetry_names_the_member(readings: object, member: str) -> None:
    document: dict[str, object] = {"v": 1, "at": "2026-11-24T06:00:00Z"}
    if readings is not None:
        document["readings"] = readings
    assert member in only_malformed(TELEMETRY, payload(document)).reason


# -- anything else -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "raw", "reason"),
    [
        ("elsewhere/x", b"{}", "topic is outside"),
        ("wardcast/v1/dev/spk-1/cmd", b"{}", "controller-to-device"),
        (ACK, b"\xff\xfe", "not UTF-8 JSON"),
        (ACK, b"{not json", "not UTF-8 JSON"),
        (ACK, b'{"v": NaN}', "not UTF-8 JSON"),
        (ACK, b"[" * 100_000, "not UTF-8 JSON"),
        (ACK, b"[1, 2]", "not a JSON object"),
        (ACK, b'{"v": 1' + b", " + b'"x": ' + b"9" * 5000 + b"}", "not UTF-8 JSON"),
    ],
)
def test_garbage_becomes_malformed_payload(topic: str, raw: bytes, reason: str) -> None:
    malformed = only_malformed(topic, raw)
    assert reason in malformed.reason
    assert len(malformed.reason) < 300


def test_reasons_stay_short_when_devices_send_a_lot() -> None:
    malformed = only_malformed(ACK, payload(report(state="x" * 1_000_000)))
    assert len(malformed.reason) < 300


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=20,
)
inbound_topics = st.sampled_from([ACK, STATE, TELEMETRY]) | st.text(max_size=80)
member_names = st.sampled_from(
    [
        "v",
        "command_id",
        "correlation_id",
        "state",
        "at",
        "played_s",
        "truncated",
        "detail",
        "online",
        "readings",
    ]
)


@given(topic=inbound_topics, raw=st.binary(max_size=2_000))
def test_decode_never_raises_on_arbitrary_bytes(topic: str, raw: bytes) -> None:
    for event in decode_inbound(topic, raw):
        assert isinstance(event, CommandReport | DeviceState | TelemetryReading | MalformedPayload)


@given(
    topic=st.sampled_from([ACK, STATE, TELEMETRY]),
    document=st.dictionaries(member_names, json_values, max_size=10),
    version=st.sampled_from([1, 1, 1, 2, "1", None]),
)
def test_decode_never_raises_on_plausible_documents(
    topic: str, document: dict[str, object], version: object
) -> None:
    document["v"] = version
    events = decode_inbound(topic, json.dumps(document).encode())
    for event in events:
        if isinstance(event, MalformedPayload):
            assert event.address == "spk-1"
            assert "`" in event.reason or "JSON" in event.reason
        else:
            assert event.address == "spk-1"
