"""OASIS Common Alerting Protocol 1.2 (2010): parsing, validation and the mapping to broadcast priorities.

Pure: no I/O beyond the bytes handed in. `parse_cap` turns one `<alert>` document into frozen dataclasses
or raises `CapError(element, detail)` for the first rule it breaks. `element` is a path through the
document with zero-based indexes on elements that may repeat, e.g. `alert/info[1]/area[0]/polygon[0]`,
`alert/sent` or `alert/info[0]/resource[2]/mimeType`, so that the API can answer 400 naming it. Problems
with the document as a whole (size, not well-formed XML, a DTD or entity, the wrong root or namespace)
name `alert`; the detail then carries the line and column where the XML parser gave up.

What is checked (CAP 1.2 §3, written from the standard, not from its XSD):
- XML: parsed by defusedxml with DTDs, entity declarations and external references refused outright.
- Structure: every element in the CAP namespace `urn:oasis:names:tc:emergency:cap:1.2`, in the order the
  standard lists them, required elements present, single elements at most once, no unknown elements,
  no attributes (other than xsi:*), no stray text between elements. XML signatures (xmldsig namespace)
  are accepted, not verified, after the last `<info>`.
- Values: the enumerations (status, msgType, scope, category, responseType, urgency, severity,
  certainty, case-sensitive as written in the standard); identifier and sender without whitespace,
  commas, `<` or `&`; the CAP date-time `YYYY-MM-DDThh:mm:ss±hh:mm` (no fractional seconds, no "Z",
  UTC written `-00:00`, offsets within ±14:00); references as whitespace-separated
  `sender,identifier,sent` triples; addresses and incidents as whitespace-separated lists with
  multi-word items in double quotes; polygons as ≥ 4 whitespace-separated `lat,lon` pairs (WGS 84,
  decimal degrees) with the first equal to the last; circles as `lat,lon radius` (radius km ≥ 0);
  valueName/value pairs with a non-empty valueName; language as an RFC 3066 tag; web as an absolute
  URI; resource size a whole number of bytes, derefUri base64, digest SHA-1 hex, uri absolute unless it
  names an embedded derefUri; altitude and ceiling decimal feet, ceiling only with altitude and not
  below it.
- Conditions: restriction when scope is Restricted; addresses when scope is Private; references when
  msgType is Update, Cancel, Ack or Error (each of these acts on the messages it references).
Surrounding whitespace in element text is ignored (pretty-printed feeds indent it); whitespace inside
a value is kept.

Field names are the CAP element names in snake_case (`msgType` → `msg_type`, `areaDesc` → `area_desc`);
repeated elements become tuples named in the plural (`code` → `codes`, `info` → `infos`).

Priority mapping (`PriorityMapping`, `priority_for`)
----------------------------------------------------
The class band comes from three rules, checked in this order:

| class     | when                                                                                    |
|-----------|-----------------------------------------------------------------------------------------|
| emergency | severity Extreme or Severe AND urgency Immediate or Expected AND certainty Observed or   |
|           | Likely: the standard's "act now" corner; plays at once and preempts (Circular 39)       |
| normal    | urgency Past, OR certainty Unlikely, OR (severity Minor or Unknown AND urgency Future or  |
|           | Unknown): nothing to do now, the ward picks the slot                                    |
| priority  | every other combination: placed first, ward staff order clashes                         |

The sub-priority (0–255) orders alerts inside a band. Each value has a rank 0–4:

| rank | severity | urgency   | certainty |
|------|----------|-----------|-----------|
| 4    | Extreme  | Immediate | Observed  |
| 3    | Severe   | Expected  | Likely    |
| 2    | Moderate | Future    | Possible  |
| 1    | Minor    | Unknown   | Unknown   |
| 0    | Unknown  | Past      | Unlikely  |

Unknown sits above Past and Unlikely because an unknown value may still be serious, while Past and
Unlikely positively say that it is not. score = 25·severity + 5·urgency + certainty (0–124), so severity
weighs most, then urgency, then certainty, and the sub-priority = ⌊score · 255 / 124⌋ is strictly
increasing in each of the three. Examples (urgency, severity, certainty → class, sub-priority):

| urgency   | severity | certainty | class     | sub |
|-----------|----------|-----------|-----------|-----|
| Immediate | Extreme  | Observed  | emergency | 255 |
| Expected  | Extreme  | Likely    | emergency | 242 |
| Immediate | Severe   | Observed  | emergency | 203 |
| Expected  | Severe   | Likely    | emergency | 191 |
| Past      | Extreme  | Observed  | normal    | 213 |
| Immediate | Moderate | Observed  | priority  | 152 |
| Expected  | Moderate | Likely    | priority  | 139 |
| Immediate | Minor    | Observed  | priority  | 100 |
| Future    | Minor    | Possible  | normal    | 76  |
| Unknown   | Unknown  | Unknown   | normal    | 12  |
| Past      | Unknown  | Unlikely  | normal    | 0   |
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Final, Literal, NamedTuple, TypeVar
from xml.etree.ElementTree import Element, ParseError

from defusedxml import (
    DTDForbidden,
    EntitiesForbidden,
    ExternalReferenceForbidden,
)
from defusedxml.ElementTree import fromstring as _defused_fromstring

from controller.domain.priority import SUB_PRIORITY_MAX, PriorityClass

CAP_NAMESPACE: Final[str] = "urn:oasis:names:tc:emergency:cap:1.2"
XMLDSIG_NAMESPACE: Final[str] = "http://www.w3.org/2000/09/xmldsig#"
XSI_NAMESPACE: Final[str] = "http://www.w3.org/2001/XMLSchema-instance"
ALERT_ELEMENT: Final[str] = "alert"
DEFAULT_LANGUAGE: Final[str] = "en-US"
# An alert is a few kilobytes; embedded (derefUri) audio can make it a few megabytes. Anything larger
# is refused before the XML parser sees it.
MAX_CAP_BYTES: Final[int] = 8 * 1024 * 1024
MIN_POLYGON_PAIRS: Final[int] = 4
LATITUDE_LIMIT: Final[float] = 90.0
LONGITUDE_LIMIT: Final[float] = 180.0
# XML Schema limits time-zone offsets to ±14:00 (Line Islands); anything beyond is a typo.
MAX_OFFSET_MINUTES: Final[int] = 14 * 60
_MINUTES_PER_HOUR: Final[int] = 60
_SHOWN_VALUE_LENGTH: Final[int] = 60
_REFERENCE_PARTS: Final[int] = 3  # sender,identifier,sent
_CIRCLE_PARTS: Final[int] = 2  # "lat,lon" and the radius

LatLon = tuple[float, float]
BroadcastMode = Literal["live", "drill"]


class CapError(ValueError):
    """The first CAP rule a document breaks. `element` is a path such as `alert/info[0]/event`."""

    def __init__(self, element: str, detail: str) -> None:
        super().__init__(f"{element}: {detail}")
        self.element = element
        self.detail = detail


class CapStatus(StrEnum):
    ACTUAL = "Actual"
    EXERCISE = "Exercise"
    SYSTEM = "System"
    TEST = "Test"
    DRAFT = "Draft"

    @property
    def broadcast_mode(self) -> BroadcastMode | None:
        """How an alert with this status is broadcast: live, as a drill, or not at all (None).

        System messages (network heartbeats) and drafts are recorded but never played.
        """
        return _BROADCAST_MODES[self]


_BROADCAST_MODES: Final[Mapping[CapStatus, BroadcastMode | None]] = {
    CapStatus.ACTUAL: "live",
    CapStatus.EXERCISE: "drill",
    CapStatus.TEST: "drill",
    CapStatus.SYSTEM: None,
    CapStatus.DRAFT: None,
}


class MsgType(StrEnum):
    ALERT = "Alert"
    UPDATE = "Update"
    CANCEL = "Cancel"
    ACK = "Ack"
    ERROR = "Error"


# These act on earlier messages, so they must say which ones.
_MSG_TYPES_WITH_REFERENCES: Final[frozenset[MsgType]] = frozenset(
    {MsgType.UPDATE, MsgType.CANCEL, MsgType.ACK, MsgType.ERROR}
)


class Scope(StrEnum):
    PUBLIC = "Public"
    RESTRICTED = "Restricted"
    PRIVATE = "Private"


class Category(StrEnum):
    GEO = "Geo"
    MET = "Met"
    SAFETY = "Safety"
    SECURITY = "Security"
    RESCUE = "Rescue"
    FIRE = "Fire"
    HEALTH = "Health"
    ENV = "Env"
    TRANSPORT = "Transport"
    INFRA = "Infra"
    CBRNE = "CBRNE"
    OTHER = "Other"


class ResponseType(StrEnum):
    SHELTER = "Shelter"
    EVACUATE = "Evacuate"
    PREPARE = "Prepare"
    EXECUTE = "Execute"
    AVOID = "Avoid"
    MONITOR = "Monitor"
    ASSESS = "Assess"
    ALL_CLEAR = "AllClear"
    NONE = "None"


class Urgency(StrEnum):
    IMMEDIATE = "Immediate"
    EXPECTED = "Expected"
    FUTURE = "Future"
    PAST = "Past"
    UNKNOWN = "Unknown"


class Severity(StrEnum):
    EXTREME = "Extreme"
    SEVERE = "Severe"
    MODERATE = "Moderate"
    MINOR = "Minor"
    UNKNOWN = "Unknown"


class Certainty(StrEnum):
    OBSERVED = "Observed"
    LIKELY = "Likely"
    POSSIBLE = "Possible"
    UNLIKELY = "Unlikely"
    UNKNOWN = "Unknown"


class CapReference(NamedTuple):
    """One earlier message named in `<references>`: the `sender,identifier,sent` triple."""

    sender: str
    identifier: str
    sent: datetime


class ValuePair(NamedTuple):
    """A `<valueName>`/`<value>` pair (eventCode, parameter, geocode)."""

    value_name: str
    value: str


class CapCircle(NamedTuple):
    """A `<circle>`: centre as (lat, lon) in WGS 84 decimal degrees and radius in kilometres."""

    center: LatLon
    radius_km: float


@dataclass(frozen=True, slots=True)
class CapResource:
    resource_desc: str
    mime_type: str
    size: int | None = None
    uri: str | None = None
    # The decoded `<derefUri>` content, when the resource travels inside the message.
    deref_data: bytes | None = None
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class CapArea:
    area_desc: str
    # Each polygon is its closed ring of (lat, lon) pairs, as CAP writes them (first == last).
    polygons: tuple[tuple[LatLon, ...], ...] = ()
    circles: tuple[CapCircle, ...] = ()
    geocodes: tuple[ValuePair, ...] = ()
    altitude: float | None = None  # feet above mean sea level
    ceiling: float | None = None


@dataclass(frozen=True, slots=True)
class CapInfo:
    categories: tuple[Category, ...]
    event: str
    urgency: Urgency
    severity: Severity
    certainty: Certainty
    language: str = DEFAULT_LANGUAGE
    response_types: tuple[ResponseType, ...] = ()
    audience: str | None = None
    event_codes: tuple[ValuePair, ...] = ()
    effective: datetime | None = None
    onset: datetime | None = None
    expires: datetime | None = None
    sender_name: str | None = None
    headline: str | None = None
    description: str | None = None
    instruction: str | None = None
    web: str | None = None
    contact: str | None = None
    parameters: tuple[ValuePair, ...] = ()
    resources: tuple[CapResource, ...] = ()
    areas: tuple[CapArea, ...] = ()


@dataclass(frozen=True, slots=True)
class CapAlert:
    identifier: str
    sender: str
    sent: datetime
    status: CapStatus
    msg_type: MsgType
    scope: Scope
    source: str | None = None
    restriction: str | None = None
    addresses: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()
    note: str | None = None
    references: tuple[CapReference, ...] = ()
    incidents: tuple[str, ...] = ()
    infos: tuple[CapInfo, ...] = ()

    @property
    def reference(self) -> CapReference:
        """How a later Update or Cancel names this alert in its `<references>`."""
        return CapReference(self.sender, self.identifier, self.sent)


# --- The standard's element sequences -------------------------------------------------------------


class _Slot(NamedTuple):
    name: str
    required: bool = False
    repeated: bool = False


_ALERT_SLOTS: Final[tuple[_Slot, ...]] = (
    _Slot("identifier", required=True),
    _Slot("sender", required=True),
    _Slot("sent", required=True),
    _Slot("status", required=True),
    _Slot("msgType", required=True),
    _Slot("source"),
    _Slot("scope", required=True),
    _Slot("restriction"),
    _Slot("addresses"),
    _Slot("code", repeated=True),
    _Slot("note"),
    _Slot("references"),
    _Slot("incidents"),
    _Slot("info", repeated=True),
)
_INFO_SLOTS: Final[tuple[_Slot, ...]] = (
    _Slot("language"),
    _Slot("category", required=True, repeated=True),
    _Slot("event", required=True),
    _Slot("responseType", repeated=True),
    _Slot("urgency", required=True),
    _Slot("severity", required=True),
    _Slot("certainty", required=True),
    _Slot("audience"),
    _Slot("eventCode", repeated=True),
    _Slot("effective"),
    _Slot("onset"),
    _Slot("expires"),
    _Slot("senderName"),
    _Slot("headline"),
    _Slot("description"),
    _Slot("instruction"),
    _Slot("web"),
    _Slot("contact"),
    _Slot("parameter", repeated=True),
    _Slot("resource", repeated=True),
    _Slot("area", repeated=True),
)
_RESOURCE_SLOTS: Final[tuple[_Slot, ...]] = (
    _Slot("resourceDesc", required=True),
    _Slot("mimeType", required=True),
    _Slot("size"),
    _Slot("uri"),
    _Slot("derefUri"),
    _Slot("digest"),
)
_AREA_SLOTS: Final[tuple[_Slot, ...]] = (
    _Slot("areaDesc", required=True),
    _Slot("polygon", repeated=True),
    _Slot("circle", repeated=True),
    _Slot("geocode", repeated=True),
    _Slot("altitude"),
    _Slot("ceiling"),
)
_VALUE_PAIR_SLOTS: Final[tuple[_Slot, ...]] = (
    _Slot("valueName", required=True),
    _Slot("value", required=True),
)

# re.ASCII: `\d` would otherwise accept Arabic-Indic, full-width and other Unicode digits.
_CAP_DATETIME: Final[re.Pattern[str]] = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})([+-])(\d{2}):(\d{2})", re.ASCII
)
_DECIMAL: Final[re.Pattern[str]] = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)
# 18 digits is an exabyte; longer runs would also trip Python's int-from-string digit limit.
_WHOLE_NUMBER: Final[re.Pattern[str]] = re.compile(r"\+?\d{1,18}", re.ASCII)
_LANGUAGE_TAG: Final[re.Pattern[str]] = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*", re.ASCII)
_URI_SCHEME: Final[re.Pattern[str]] = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:", re.ASCII)
_MIME_NAME: Final[str] = r"[A-Za-z0-9!#$&^_.+-]+"
_MIME_TYPE: Final[re.Pattern[str]] = re.compile(rf"{_MIME_NAME}/{_MIME_NAME}(?:\s*;.*)?", re.ASCII)
_SHA1_HEX: Final[re.Pattern[str]] = re.compile(r"[0-9A-Fa-f]{40}", re.ASCII)
# One item of a whitespace-separated list; items containing spaces are wrapped in double quotes.
_LIST_ITEM: Final[re.Pattern[str]] = re.compile(r'\s*(?:"([^"]*)"|([^\s"]+))\s*')
_FORBIDDEN_ID_CHARACTERS: Final[frozenset[str]] = frozenset(",<&")
_EXPAT_POSITION_SUFFIX: Final[re.Pattern[str]] = re.compile(r": line \d+, column \d+$")

_EnumT = TypeVar("_EnumT", bound=StrEnum)


# --- Public entry points --------------------------------------------------------------------------


def parse_cap(data: bytes, *, max_bytes: int = MAX_CAP_BYTES) -> CapAlert:
    """Parse and validate one CAP 1.2 `<alert>`; raises `CapError` naming the first offending element."""
    root = _parse_xml(data, max_bytes)
    return _alert(root)


def parse_cap_datetime(text: str, element: str = "datetime") -> datetime:
    """A CAP date-time (`2026-11-24T17:30:00+07:00`, UTC as `-00:00`) as an aware datetime."""
    match = _CAP_DATETIME.fullmatch(text)
    if match is None:
        raise CapError(element, _datetime_problem(text))
    year, month, day, hour, minute, second, sign, offset_hours, offset_minutes = match.groups()
    if sign == "+" and offset_hours == "00" and offset_minutes == "00":
        raise CapError(element, "UTC must be written -00:00, not +00:00")
    offset = int(offset_hours) * _MINUTES_PER_HOUR + int(offset_minutes)
    if int(offset_minutes) >= _MINUTES_PER_HOUR or offset > MAX_OFFSET_MINUTES:
        raise CapError(element, f"time-zone offset {sign}{offset_hours}:{offset_minutes} is out of range")
    zone = timezone(timedelta(minutes=-offset if sign == "-" else offset))
    try:
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=zone)
    except ValueError as error:
        raise CapError(element, f"{_shown(text)} is not a real date and time ({error})") from error


def format_cap_datetime(moment: datetime) -> str:
    """An aware datetime in the CAP format: whole seconds, numeric offset, UTC as `-00:00`."""
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError("CAP date-times need a time zone")
    if offset % timedelta(minutes=1):
        raise ValueError("CAP time-zone offsets are whole minutes")
    text = moment.replace(microsecond=0).isoformat()
    return text.removesuffix("+00:00") + "-00:00" if offset == timedelta(0) else text


def preferred_info(alert: CapAlert, languages: Sequence[str] = ("vi", "vi-VN")) -> CapInfo | None:
    """The info block to broadcast: the first in the first of `languages` that any block has, else the
    first block; None when the alert has none.

    Languages match on their primary subtag, case-insensitively, so `vi` finds `vi-VN` and `VI`.
    """
    if not alert.infos:
        return None
    for wanted in languages:
        wanted_primary = _primary_subtag(wanted)
        for info in alert.infos:
            if _primary_subtag(info.language) == wanted_primary:
                return info
    return alert.infos[0]


class CapPriority(NamedTuple):
    priority_class: PriorityClass
    sub_priority: int


_LEVELS: Final[int] = 5
_MAX_SCORE: Final[int] = _LEVELS**3 - 1
_SEVERITY_RANK: Final[Mapping[Severity, int]] = {
    Severity.UNKNOWN: 0,
    Severity.MINOR: 1,
    Severity.MODERATE: 2,
    Severity.SEVERE: 3,
    Severity.EXTREME: 4,
}
_URGENCY_RANK: Final[Mapping[Urgency, int]] = {
    Urgency.PAST: 0,
    Urgency.UNKNOWN: 1,
    Urgency.FUTURE: 2,
    Urgency.EXPECTED: 3,
    Urgency.IMMEDIATE: 4,
}
_CERTAINTY_RANK: Final[Mapping[Certainty, int]] = {
    Certainty.UNLIKELY: 0,
    Certainty.UNKNOWN: 1,
    Certainty.POSSIBLE: 2,
    Certainty.LIKELY: 3,
    Certainty.OBSERVED: 4,
}
_EMERGENCY_SEVERITIES: Final[frozenset[Severity]] = frozenset({Severity.EXTREME, Severity.SEVERE})
_EMERGENCY_URGENCIES: Final[frozenset[Urgency]] = frozenset({Urgency.IMMEDIATE, Urgency.EXPECTED})
_EMERGENCY_CERTAINTIES: Final[frozenset[Certainty]] = frozenset({Certainty.OBSERVED, Certainty.LIKELY})
_LOW_SEVERITIES: Final[frozenset[Severity]] = frozenset({Severity.MINOR, Severity.UNKNOWN})
_DISTANT_URGENCIES: Final[frozenset[Urgency]] = frozenset({Urgency.FUTURE, Urgency.UNKNOWN})

PriorityKey = tuple[Urgency, Severity, Certainty]


class PriorityMapping(Mapping[PriorityKey, CapPriority]):
    """The full table (urgency, severity, certainty) → (priority class, sub-priority 0–255).

    All 125 combinations are present; the rules and examples are in this module's docstring. Being a
    Mapping, the table can be listed (for the console, or a city's review) as well as looked up.
    """

    def __init__(self) -> None:
        self._table: dict[PriorityKey, CapPriority] = {
            (urgency, severity, certainty): CapPriority(
                _priority_class(urgency, severity, certainty), _sub_priority(urgency, severity, certainty)
            )
            for urgency in Urgency
            for severity in Severity
            for certainty in Certainty
        }

    def __getitem__(self, key: PriorityKey) -> CapPriority:
        return self._table[key]

    def __iter__(self) -> Iterator[PriorityKey]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


def _priority_class(urgency: Urgency, severity: Severity, certainty: Certainty) -> PriorityClass:
    if (
        severity in _EMERGENCY_SEVERITIES
        and urgency in _EMERGENCY_URGENCIES
        and certainty in _EMERGENCY_CERTAINTIES
    ):
        return PriorityClass.EMERGENCY
    if (
        urgency is Urgency.PAST
        or certainty is Certainty.UNLIKELY
        or (severity in _LOW_SEVERITIES and urgency in _DISTANT_URGENCIES)
    ):
        return PriorityClass.NORMAL
    return PriorityClass.PRIORITY


def _sub_priority(urgency: Urgency, severity: Severity, certainty: Certainty) -> int:
    score = (
        _SEVERITY_RANK[severity] * _LEVELS**2 + _URGENCY_RANK[urgency] * _LEVELS + _CERTAINTY_RANK[certainty]
    )
    return score * SUB_PRIORITY_MAX // _MAX_SCORE


PRIORITY_MAPPING: Final[PriorityMapping] = PriorityMapping()


def priority_for(info: CapInfo, mapping: Mapping[PriorityKey, CapPriority] = PRIORITY_MAPPING) -> CapPriority:
    """The broadcast priority for one info block: (class, sub-priority), see the module docstring."""
    return mapping[info.urgency, info.severity, info.certainty]


# --- XML ------------------------------------------------------------------------------------------


def _parse_xml(data: bytes, max_bytes: int) -> Element:
    if len(data) > max_bytes:
        raise CapError(ALERT_ELEMENT, f"the document is {len(data)} bytes; the limit is {max_bytes}")
    try:
        root: Element = _defused_fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DTDForbidden as error:
        raise CapError(ALERT_ELEMENT, "document type declarations (DTD) are not accepted") from error
    except EntitiesForbidden as error:
        raise CapError(ALERT_ELEMENT, "entity declarations are not accepted") from error
    except ExternalReferenceForbidden as error:
        raise CapError(ALERT_ELEMENT, "external references are not accepted") from error
    except ParseError as error:
        line, column = error.position
        # expat's message ends with its own (zero-based) position; say it once, counting from 1.
        reason = _EXPAT_POSITION_SUFFIX.sub("", str(error))
        raise CapError(
            ALERT_ELEMENT, f"not well-formed XML at line {line}, column {column + 1}: {reason}"
        ) from error
    except (LookupError, ValueError) as error:
        # An unknown or lying encoding declaration surfaces from expat as one of these.
        raise CapError(ALERT_ELEMENT, f"the document cannot be decoded ({error})") from error
    namespace, local = _split_tag(root.tag)
    if local != ALERT_ELEMENT:
        raise CapError(ALERT_ELEMENT, f"the root element must be <alert>, not <{local}>")
    if namespace != CAP_NAMESPACE:
        raise CapError(
            ALERT_ELEMENT,
            f"the namespace must be {CAP_NAMESPACE} (CAP 1.2), not {namespace or 'none'}",
        )
    return root


def _split_tag(tag: str) -> tuple[str, str]:
    """`{namespace}local` → (namespace, local); ("", tag) without a namespace."""
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return namespace, local
    return "", tag


def _check_attributes(element: Element, path: str) -> None:
    for name in element.attrib:
        # xsi:schemaLocation and friends are allowed on any element of any schema.
        if _split_tag(name)[0] != XSI_NAMESPACE:
            raise CapError(path, f"unexpected attribute {name!r}; CAP elements have none")


class _Children:
    """The children of one container element, checked against its slots (order, presence, counts)."""

    def __init__(
        self, element: Element, path: str, slots: tuple[_Slot, ...], *, allow_signature: bool = False
    ) -> None:
        self.path = path
        self._slots = {slot.name: slot for slot in slots}
        self._found: dict[str, list[Element]] = {slot.name: [] for slot in slots}
        _check_attributes(element, path)
        if element.text and element.text.strip():
            raise CapError(path, "unexpected text; this element holds only other elements")
        order = {slot.name: index for index, slot in enumerate(slots)}
        last_index, last_name = -1, ""
        signature_seen = False
        for child in element:
            namespace, local = _split_tag(child.tag)
            if child.tail and child.tail.strip():
                raise CapError(path, f"unexpected text after <{local}>")
            if allow_signature and namespace == XMLDSIG_NAMESPACE:
                signature_seen = True
                continue
            index = order.get(local)
            if namespace != CAP_NAMESPACE:
                raise CapError(
                    f"{path}/{local}",
                    f"element in namespace {namespace or 'none'} is not allowed here; "
                    f"CAP elements are in {CAP_NAMESPACE}",
                )
            if index is None:
                expected = ", ".join(slot.name for slot in slots)
                raise CapError(f"{path}/{local}", f"unknown element; expected one of {expected}")
            child_path = self._path_of(local, len(self._found[local]))
            if signature_seen:
                raise CapError(child_path, "must come before the XML signature")
            if index < last_index:
                raise CapError(child_path, f"out of order: <{local}> must come before <{last_name}>")
            last_index, last_name = index, local
            self._found[local].append(child)
        for slot in slots:
            elements = self._found[slot.name]
            if slot.required and not elements:
                raise CapError(f"{path}/{slot.name}", "required element is missing")
            if not slot.repeated and len(elements) > 1:
                raise CapError(f"{path}/{slot.name}", f"may appear only once (found {len(elements)})")

    def _path_of(self, name: str, index: int) -> str:
        return f"{self.path}/{name}[{index}]" if self._slots[name].repeated else f"{self.path}/{name}"

    def optional(self, name: str) -> tuple[str, str] | None:
        """(path, text) of a single element, or None when it is absent."""
        elements = self._found[name]
        if not elements:
            return None
        path = self._path_of(name, 0)
        return path, _text(elements[0], path)

    def optional_text(self, name: str) -> str | None:
        found = self.optional(name)
        return None if found is None else found[1]

    def required(self, name: str) -> tuple[str, str]:
        """(path, text) of a required element whose text may not be empty."""
        found = self.optional(name)
        if found is None:  # the constructor already refused this; kept for the type checker
            raise CapError(f"{self.path}/{name}", "required element is missing")
        path, text = found
        if not text:
            raise CapError(path, "must not be empty")
        return found

    def texts(self, name: str) -> list[tuple[str, str]]:
        """(path, text) of every occurrence of a repeatable element."""
        return [(path, _text(element, path)) for path, element in self.elements(name)]

    def elements(self, name: str) -> list[tuple[str, Element]]:
        return [(self._path_of(name, index), element) for index, element in enumerate(self._found[name])]


def _text(element: Element, path: str) -> str:
    _check_attributes(element, path)
    if len(element):
        raise CapError(path, "must hold text, not elements")
    return (element.text or "").strip()


# --- Elements -------------------------------------------------------------------------------------


def _alert(root: Element) -> CapAlert:
    children = _Children(root, ALERT_ELEMENT, _ALERT_SLOTS, allow_signature=True)
    identifier = _message_id(*children.required("identifier"))
    sender = _message_id(*children.required("sender"))
    sent_path, sent_text = children.required("sent")
    sent = parse_cap_datetime(sent_text, sent_path)
    status = _enum(CapStatus, *children.required("status"))
    msg_type = _enum(MsgType, *children.required("msgType"))
    scope = _enum(Scope, *children.required("scope"))

    restriction = children.optional_text("restriction")
    if scope is Scope.RESTRICTED and not restriction:
        raise CapError(f"{ALERT_ELEMENT}/restriction", "required when scope is Restricted")
    addresses_found = children.optional("addresses")
    addresses = () if addresses_found is None else _delimited_list(*addresses_found)
    if scope is Scope.PRIVATE and not addresses:
        raise CapError(f"{ALERT_ELEMENT}/addresses", "required when scope is Private")
    references_found = children.optional("references")
    references = () if references_found is None else _references(*references_found)
    if msg_type in _MSG_TYPES_WITH_REFERENCES and not references:
        raise CapError(f"{ALERT_ELEMENT}/references", f"required when msgType is {msg_type}")
    incidents_found = children.optional("incidents")

    return CapAlert(
        identifier=identifier,
        sender=sender,
        sent=sent,
        status=status,
        msg_type=msg_type,
        scope=scope,
        source=children.optional_text("source"),
        restriction=restriction,
        addresses=addresses,
        codes=tuple(text for _, text in children.texts("code")),
        note=children.optional_text("note"),
        references=references,
        incidents=() if incidents_found is None else _delimited_list(*incidents_found),
        infos=tuple(_info(element, path) for path, element in children.elements("info")),
    )


def _info(element: Element, path: str) -> CapInfo:
    children = _Children(element, path, _INFO_SLOTS)
    language_found = children.optional("language")
    language = DEFAULT_LANGUAGE if language_found is None else _language(*language_found)
    web_found = children.optional("web")
    return CapInfo(
        language=language,
        categories=tuple(_enum(Category, *found) for found in children.texts("category")),
        event=children.required("event")[1],
        response_types=tuple(_enum(ResponseType, *found) for found in children.texts("responseType")),
        urgency=_enum(Urgency, *children.required("urgency")),
        severity=_enum(Severity, *children.required("severity")),
        certainty=_enum(Certainty, *children.required("certainty")),
        audience=children.optional_text("audience"),
        event_codes=tuple(
            _value_pair(child, child_path) for child_path, child in children.elements("eventCode")
        ),
        effective=_optional_datetime(children, "effective"),
        onset=_optional_datetime(children, "onset"),
        expires=_optional_datetime(children, "expires"),
        sender_name=children.optional_text("senderName"),
        headline=children.optional_text("headline"),
        description=children.optional_text("description"),
        instruction=children.optional_text("instruction"),
        web=None if web_found is None else _absolute_uri(*web_found),
        contact=children.optional_text("contact"),
        parameters=tuple(
            _value_pair(child, child_path) for child_path, child in children.elements("parameter")
        ),
        resources=tuple(_resource(child, child_path) for child_path, child in children.elements("resource")),
        areas=tuple(_area(child, child_path) for child_path, child in children.elements("area")),
    )


def _resource(element: Element, path: str) -> CapResource:
    children = _Children(element, path, _RESOURCE_SLOTS)
    resource_desc = children.required("resourceDesc")[1]
    mime_path, mime_type = children.required("mimeType")
    if not _MIME_TYPE.fullmatch(mime_type):
        raise CapError(mime_path, f"{_shown(mime_type)} is not a MIME type such as audio/mpeg")
    size_found = children.optional("size")
    size = None if size_found is None else _size(*size_found)
    deref_found = children.optional("derefUri")
    deref_data = None if deref_found is None else _base64(*deref_found)
    uri_found = children.optional("uri")
    uri = None
    if uri_found is not None:
        # A relative uri is allowed only as the name of content embedded in derefUri.
        uri = _relative_uri(*uri_found) if deref_data is not None else _absolute_uri(*uri_found)
    digest_found = children.optional("digest")
    if digest_found is not None and not _SHA1_HEX.fullmatch(digest_found[1]):
        raise CapError(digest_found[0], "must be a SHA-1 digest (40 hexadecimal digits)")
    return CapResource(
        resource_desc=resource_desc,
        mime_type=mime_type,
        size=size,
        uri=uri,
        deref_data=deref_data,
        digest=None if digest_found is None else digest_found[1],
    )


def _area(element: Element, path: str) -> CapArea:
    children = _Children(element, path, _AREA_SLOTS)
    area_desc = children.required("areaDesc")[1]
    altitude_found = children.optional("altitude")
    ceiling_found = children.optional("ceiling")
    altitude = None if altitude_found is None else _decimal(*altitude_found, "altitude in feet")
    ceiling = None
    if ceiling_found is not None:
        ceiling_path, _ = ceiling_found
        if altitude is None:
            raise CapError(ceiling_path, "may be used only together with altitude")
        ceiling = _decimal(*ceiling_found, "ceiling in feet")
        if ceiling < altitude:
            raise CapError(ceiling_path, f"ceiling {ceiling:g} is below altitude {altitude:g}")
    return CapArea(
        area_desc=area_desc,
        polygons=tuple(_polygon(*found) for found in children.texts("polygon")),
        circles=tuple(_circle(*found) for found in children.texts("circle")),
        geocodes=tuple(_value_pair(child, child_path) for child_path, child in children.elements("geocode")),
        altitude=altitude,
        ceiling=ceiling,
    )


def _value_pair(element: Element, path: str) -> ValuePair:
    children = _Children(element, path, _VALUE_PAIR_SLOTS)
    value_name = children.required("valueName")[1]
    value_found = children.optional("value")
    return ValuePair(value_name, "" if value_found is None else value_found[1])


# --- Values ---------------------------------------------------------------------------------------


def _shown(value: str) -> str:
    """A value quoted for an error message, cut short so that hostile input cannot flood the answer."""
    if len(value) > _SHOWN_VALUE_LENGTH:
        value = value[:_SHOWN_VALUE_LENGTH] + "…"
    return repr(value)


def _enum(enum_type: type[_EnumT], path: str, text: str) -> _EnumT:
    try:
        return enum_type(text)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise CapError(path, f"must be one of {allowed} (got {_shown(text)})") from None


def _message_id(path: str, text: str) -> str:
    """identifier and sender: no whitespace, commas or the XML-restricted < and &."""
    if any(character.isspace() for character in text):
        raise CapError(path, f"must not contain spaces (got {_shown(text)})")
    bad = sorted(set(text) & _FORBIDDEN_ID_CHARACTERS)
    if bad:
        raise CapError(path, f"must not contain {' or '.join(repr(c) for c in bad)} (got {_shown(text)})")
    return text


def _datetime_problem(text: str) -> str:
    expected = "must be YYYY-MM-DDThh:mm:ss±hh:mm, e.g. 2026-11-24T17:30:00+07:00"
    if text.endswith(("Z", "z")):
        return f"{expected}: 'Z' is not allowed, write UTC as -00:00 (got {_shown(text)})"
    if re.search(r"T\d\d:\d\d:\d\d[.,]", text, re.ASCII):
        return f"{expected}: fractional seconds are not allowed (got {_shown(text)})"
    return f"{expected} (got {_shown(text)})"


def _optional_datetime(children: _Children, name: str) -> datetime | None:
    found = children.optional(name)
    return None if found is None else parse_cap_datetime(found[1], found[0])


def _decimal(path: str, text: str, what: str) -> float:
    if not _DECIMAL.fullmatch(text):
        raise CapError(path, f"must be a decimal number ({what}), got {_shown(text)}")
    value = float(text)
    if not math.isfinite(value):  # hundreds of digits overflow to infinity
        raise CapError(path, f"{_shown(text)} is too large ({what})")
    return value


def _size(path: str, text: str) -> int:
    if not _WHOLE_NUMBER.fullmatch(text):
        raise CapError(path, f"must be a whole number of bytes ≥ 0, got {_shown(text)}")
    return int(text)


def _base64(path: str, text: str) -> bytes:
    compact = "".join(text.split())  # line breaks inside base64 are common and harmless
    if not compact:
        raise CapError(path, "must not be empty")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise CapError(path, f"must be base64 ({error})") from error


def _absolute_uri(path: str, text: str) -> str:
    if not text or any(character.isspace() for character in text) or not _URI_SCHEME.match(text):
        raise CapError(path, f"must be a full absolute URI such as https://…, got {_shown(text)}")
    return text


def _relative_uri(path: str, text: str) -> str:
    if not text or any(character.isspace() for character in text):
        raise CapError(path, f"must be a URI without spaces, got {_shown(text)}")
    return text


def _language(path: str, text: str) -> str:
    if not _LANGUAGE_TAG.fullmatch(text):
        raise CapError(path, f"must be an RFC 3066 language tag such as vi-VN, got {_shown(text)}")
    return text


def _primary_subtag(language: str) -> str:
    return language.split("-", 1)[0].casefold()


def _delimited_list(path: str, text: str) -> tuple[str, ...]:
    """addresses / incidents: whitespace-separated items, multi-word items in double quotes."""
    items: list[str] = []
    position = 0
    while position < len(text):
        match = _LIST_ITEM.match(text, position)
        if match is None:
            raise CapError(path, f"unbalanced double quote at character {position + 1}")
        quoted, bare = match.groups()
        item = quoted if quoted is not None else bare
        if item.strip():
            items.append(item)
        position = match.end()
    return tuple(items)


def _references(path: str, text: str) -> tuple[CapReference, ...]:
    references: list[CapReference] = []
    for number, triple in enumerate(text.split(), start=1):
        parts = triple.split(",")
        if len(parts) != _REFERENCE_PARTS:
            raise CapError(path, f"reference {number} must be sender,identifier,sent (got {_shown(triple)})")
        sender, identifier, sent = parts
        label = f"reference {number}"
        if not sender or not identifier:
            raise CapError(path, f"{label} has an empty sender or identifier (got {_shown(triple)})")
        _message_id(path, sender)
        _message_id(path, identifier)
        try:
            sent_at = parse_cap_datetime(sent, path)
        except CapError as error:
            raise CapError(path, f"{label}: sent {error.detail}") from error
        references.append(CapReference(sender, identifier, sent_at))
    if not references:
        raise CapError(path, "must name at least one earlier message as sender,identifier,sent")
    return tuple(references)


def _lat_lon(path: str, pair: str, label: str) -> LatLon:
    lat_text, comma, lon_text = pair.partition(",")
    if not comma or not _DECIMAL.fullmatch(lat_text) or not _DECIMAL.fullmatch(lon_text):
        raise CapError(path, f"{label} must be lat,lon in decimal degrees (got {_shown(pair)})")
    lat, lon = float(lat_text), float(lon_text)
    if not -LATITUDE_LIMIT <= lat <= LATITUDE_LIMIT:
        raise CapError(path, f"{label}: latitude {lat_text} is outside [-90, 90]")
    if not -LONGITUDE_LIMIT <= lon <= LONGITUDE_LIMIT:
        raise CapError(path, f"{label}: longitude {lon_text} is outside [-180, 180]")
    return lat, lon


def _polygon(path: str, text: str) -> tuple[LatLon, ...]:
    pairs = text.split()
    if len(pairs) < MIN_POLYGON_PAIRS:
        raise CapError(
            path, f"needs at least {MIN_POLYGON_PAIRS} lat,lon pairs, first equal to last (got {len(pairs)})"
        )
    points = tuple(_lat_lon(path, pair, f"pair {number}") for number, pair in enumerate(pairs, start=1))
    if points[0] != points[-1]:
        raise CapError(path, f"is not closed: the first pair {pairs[0]} differs from the last {pairs[-1]}")
    return points


def _circle(path: str, text: str) -> CapCircle:
    parts = text.split()
    if len(parts) != _CIRCLE_PARTS:
        raise CapError(path, f"must be 'lat,lon radius' with the radius in km (got {_shown(text)})")
    center_text, radius_text = parts
    center = _lat_lon(path, center_text, "centre")
    radius_km = _decimal(path, radius_text, "radius in km")
    if radius_km < 0:
        raise CapError(path, f"radius {radius_text} km must not be negative")
    return CapCircle(center, radius_km)
