"""Modbus bytes as a server reads and writes them (docs/protocol.md §3), written from the specifications.

Modbus Application Protocol V1.1b3 gives the PDU (function code + data), the quantity limits and the
exception responses; Modbus over Serial Line V1.02 gives the RTU frame (slave address + PDU + CRC-16,
low byte first) and the 3.5-character silence between frames; Modbus Messaging on TCP/IP
Implementation Guide V1.0b gives the MBAP header. The register codec turns an engineering value into
16-bit registers for the data types and byte/word orders of the register map.

Pure functions and value types only: nothing here touches a socket or a clock. This module is written
independently of pymodbus (which the controller's driver uses) so that a misreading of the
specification cannot hide by being shared by both ends.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

# In the PDU each of the four tables is addressed 0..65535.
ADDRESS_SPACE: Final = 0x10000
# Modbus Application Protocol V1.1b3 §4.1: 256-byte serial ADU - address - CRC.
MAX_PDU_LENGTH: Final = 253
# §6.1, §6.2: quantity of coils / discrete inputs one read may ask for.
MAX_READ_BITS: Final = 0x07D0
# §6.3, §6.4.
MAX_READ_REGISTERS: Final = 0x007D
# §6.11.
MAX_WRITE_BITS: Final = 0x07B0
# §6.12.
MAX_WRITE_REGISTERS: Final = 0x007B
# §6.5: the only two values "write single coil" takes.
COIL_ON: Final = 0xFF00
COIL_OFF: Final = 0x0000
EXCEPTION_FLAG: Final = 0x80
# An exception code is one byte (§7); a fault injected may use any, not only those the box knows.
MAX_EXCEPTION_CODE: Final = 0xFF

# Modbus over Serial Line V1.02 §2.2: address 0 is broadcast, 1–247 are slaves, 248–255 are reserved.
BROADCAST_ADDRESS: Final = 0
MAX_SLAVE_ADDRESS: Final = 247
MAX_RTU_FRAME_LENGTH: Final = 256
MIN_RTU_FRAME_LENGTH: Final = 4
# §2.5.1.1: an RTU character is 11 bits (start, 8 data, parity or a second stop bit, stop).
BITS_PER_RTU_CHARACTER: Final = 11
# §2.5.1.1: above 19,200 bit/s the silences are fixed instead of scaling with the baud rate.
FIXED_TIMING_ABOVE_BAUD: Final = 19_200
FIXED_INTER_FRAME_SILENCE_S: Final = 0.001_750

# Implementation Guide §3.1.3: transaction id, protocol id (0 = Modbus), length, unit id.
MBAP_HEADER: Final = struct.Struct(">HHHB")
MBAP_HEADER_LENGTH: Final = MBAP_HEADER.size
MODBUS_PROTOCOL_ID: Final = 0
# The unit id a server addressed directly by its IP address answers to (Implementation Guide).
TCP_DIRECT_UNIT_ID: Final = 0xFF

_CRC_POLYNOMIAL: Final = 0xA001  # 0x8005 bit-reversed: the CRC is computed least significant bit first
_CRC_INITIAL: Final = 0xFFFF


class FunctionCode(IntEnum):
    READ_COILS = 0x01
    READ_DISCRETE_INPUTS = 0x02
    READ_HOLDING_REGISTERS = 0x03
    READ_INPUT_REGISTERS = 0x04
    WRITE_SINGLE_COIL = 0x05
    WRITE_SINGLE_REGISTER = 0x06
    WRITE_MULTIPLE_COILS = 0x0F
    WRITE_MULTIPLE_REGISTERS = 0x10


READ_FUNCTIONS: Final = frozenset(
    {
        FunctionCode.READ_COILS,
        FunctionCode.READ_DISCRETE_INPUTS,
        FunctionCode.READ_HOLDING_REGISTERS,
        FunctionCode.READ_INPUT_REGISTERS,
    }
)
BIT_READ_FUNCTIONS: Final = frozenset({FunctionCode.READ_COILS, FunctionCode.READ_DISCRETE_INPUTS})


class ExceptionCode(IntEnum):
    """Application Protocol §7. A server may answer other codes; these are the ones the box uses."""

    ILLEGAL_FUNCTION = 0x01
    ILLEGAL_DATA_ADDRESS = 0x02
    ILLEGAL_DATA_VALUE = 0x03
    SERVER_DEVICE_FAILURE = 0x04


class ModbusExceptionError(Exception):
    """A request the server answers with an exception response (function code | 0x80, code)."""

    def __init__(self, function: int, code: int, reason: str) -> None:
        super().__init__(f"function {function:#04x}: exception {code:#04x}: {reason}")
        self.function = function
        self.code = code
        self.reason = reason


class FrameError(ValueError):
    """Bytes that are not a frame the server can answer (bad CRC, too short, empty PDU): it stays
    silent, as the serial line specification requires."""


class CrcMismatchError(FrameError):
    """An RTU frame whose CRC does not match its bytes: damaged on the line."""


# Requests (Application Protocol §6)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Function 01, 02, 03 or 04."""

    function: FunctionCode
    address: int
    quantity: int


@dataclass(frozen=True, slots=True)
class WriteCoilsRequest:
    """Function 05 (one value) or 15."""

    function: FunctionCode
    address: int
    values: tuple[bool, ...]

    @property
    def quantity(self) -> int:
        return len(self.values)


@dataclass(frozen=True, slots=True)
class WriteRegistersRequest:
    """Function 06 (one value) or 16."""

    function: FunctionCode
    address: int
    values: tuple[int, ...]

    @property
    def quantity(self) -> int:
        return len(self.values)


Request = ReadRequest | WriteCoilsRequest | WriteRegistersRequest


def request_function(pdu: bytes) -> int:
    """The function code of a PDU; a PDU without one is not a request at all."""
    if not pdu:
        raise FrameError("empty PDU: no function code")
    return pdu[0]


def decode_request(pdu: bytes) -> Request:
    """The request in `pdu`, checked in the order of the Application Protocol's state diagrams:
    function supported (01), then quantity and byte count (03). Whether the addresses exist is the
    server's business (02)."""
    raw_function = request_function(pdu)
    try:
        function = FunctionCode(raw_function)
    except ValueError:
        raise ModbusExceptionError(
            raw_function, ExceptionCode.ILLEGAL_FUNCTION, "function not supported"
        ) from None
    data = pdu[1:]
    if function in READ_FUNCTIONS:
        address, quantity = _fixed_fields(function, data)
        limit = MAX_READ_BITS if function in BIT_READ_FUNCTIONS else MAX_READ_REGISTERS
        if not 1 <= quantity <= limit:
            raise _illegal_value(function, f"quantity {quantity} outside 1..{limit}")
        return ReadRequest(function, address, quantity)
    if function is FunctionCode.WRITE_SINGLE_COIL:
        address, value = _fixed_fields(function, data)
        if value not in {COIL_ON, COIL_OFF}:
            raise _illegal_value(function, f"coil value {value:#06x} is neither 0xFF00 nor 0x0000")
        return WriteCoilsRequest(function, address, (value == COIL_ON,))
    if function is FunctionCode.WRITE_SINGLE_REGISTER:
        address, value = _fixed_fields(function, data)
        return WriteRegistersRequest(function, address, (value,))
    address, quantity, payload = _multiple_write_fields(function, data)
    if function is FunctionCode.WRITE_MULTIPLE_COILS:
        if not 1 <= quantity <= MAX_WRITE_BITS or len(payload) != _bit_byte_count(quantity):
            raise _illegal_value(function, f"quantity {quantity} with {len(payload)} data bytes")
        return WriteCoilsRequest(function, address, unpack_bits(payload, quantity))
    if not 1 <= quantity <= MAX_WRITE_REGISTERS or len(payload) != 2 * quantity:
        raise _illegal_value(function, f"quantity {quantity} with {len(payload)} data bytes")
    return WriteRegistersRequest(function, address, struct.unpack(f">{quantity}H", payload))


def _fixed_fields(function: FunctionCode, data: bytes) -> tuple[int, int]:
    # Functions 01–06 carry exactly two 16-bit fields; any other length is a malformed request.
    if len(data) != 4:  # noqa: PLR2004 - two 16-bit fields
        raise _illegal_value(function, f"{len(data)} data bytes where 4 are expected")
    first, second = struct.unpack(">HH", data)
    return first, second


def _multiple_write_fields(function: FunctionCode, data: bytes) -> tuple[int, int, bytes]:
    # Starting address, quantity, byte count, then byte count bytes of values.
    if len(data) < 5:  # noqa: PLR2004 - address, quantity and byte count
        raise _illegal_value(function, f"{len(data)} data bytes: no room for the byte count")
    address, quantity, byte_count = struct.unpack(">HHB", data[:5])
    payload = data[5:]
    if byte_count != len(payload):
        raise _illegal_value(function, f"byte count {byte_count} but {len(payload)} bytes follow")
    return address, quantity, payload


def _illegal_value(function: FunctionCode, reason: str) -> ModbusExceptionError:
    return ModbusExceptionError(function, ExceptionCode.ILLEGAL_DATA_VALUE, reason)


# Responses


def read_bits_response(function: FunctionCode, bits: tuple[bool, ...]) -> bytes:
    packed = pack_bits(bits)
    return bytes((function, len(packed))) + packed


def read_registers_response(function: FunctionCode, registers: tuple[int, ...]) -> bytes:
    return bytes((function, 2 * len(registers))) + struct.pack(f">{len(registers)}H", *registers)


def write_response(request: WriteCoilsRequest | WriteRegistersRequest) -> bytes:
    """Single writes echo the request (§6.5, §6.6); multiple writes answer address and quantity."""
    if request.function is FunctionCode.WRITE_SINGLE_COIL:
        value = COIL_ON if request.values[0] else COIL_OFF
        return struct.pack(">BHH", request.function, request.address, value)
    if request.function is FunctionCode.WRITE_SINGLE_REGISTER:
        return struct.pack(">BHH", request.function, request.address, request.values[0])
    return struct.pack(">BHH", request.function, request.address, request.quantity)


def exception_response(function: int, code: int) -> bytes:
    return bytes((function | EXCEPTION_FLAG, code))


def pack_bits(bits: tuple[bool, ...]) -> bytes:
    """The first bit in the least significant bit of the first byte; the last byte padded with zeros."""
    packed = bytearray(_bit_byte_count(len(bits)))
    for index, bit in enumerate(bits):
        if bit:
            packed[index // 8] |= 1 << (index % 8)
    return bytes(packed)


def unpack_bits(data: bytes, count: int) -> tuple[bool, ...]:
    return tuple(bool(data[index // 8] & (1 << (index % 8))) for index in range(count))


def _bit_byte_count(bit_count: int) -> int:
    return (bit_count + 7) // 8


# RTU framing (Modbus over Serial Line V1.02 §2.5.1)


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC_POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS of `data`; it travels low byte first."""
    crc = _CRC_INITIAL
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def rtu_frame(address: int, pdu: bytes) -> bytes:
    body = bytes((address,)) + pdu
    return body + crc16(body).to_bytes(2, "little")


def split_rtu_frame(frame: bytes) -> tuple[int, bytes]:
    """(slave address, PDU) of a frame whose CRC is right."""
    if len(frame) < MIN_RTU_FRAME_LENGTH:
        raise FrameError(f"{len(frame)} bytes are too short for an RTU frame")
    if len(frame) > MAX_RTU_FRAME_LENGTH:
        raise FrameError(f"{len(frame)} bytes are too long for an RTU frame")
    body, received = frame[:-2], int.from_bytes(frame[-2:], "little")
    if crc16(body) != received:
        raise CrcMismatchError(f"CRC {received:#06x} where {crc16(body):#06x} was due")
    return body[0], body[1:]


def inter_frame_silence_s(baud: int) -> float:
    """t3.5: the silence that ends a frame at `baud` (§2.5.1.1)."""
    if baud <= 0:
        raise ValueError(f"baud rate {baud} is not positive")
    if baud > FIXED_TIMING_ABOVE_BAUD:
        return FIXED_INTER_FRAME_SILENCE_S
    return 3.5 * BITS_PER_RTU_CHARACTER / baud


# Modbus TCP (MBAP)


@dataclass(frozen=True, slots=True)
class MbapHeader:
    transaction_id: int
    protocol_id: int
    # Bytes that follow the length field: the unit id and the PDU.
    length: int
    unit_id: int

    @property
    def pdu_length(self) -> int:
        return self.length - 1

    @classmethod
    def unpack(cls, header: bytes) -> MbapHeader:
        return cls(*MBAP_HEADER.unpack(header))


def mbap_frame(transaction_id: int, unit_id: int, pdu: bytes) -> bytes:
    return MBAP_HEADER.pack(transaction_id, MODBUS_PROTOCOL_ID, len(pdu) + 1, unit_id) + pdu


# Register codec: an engineering value as one or two 16-bit registers


class DataType(StrEnum):
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    FLOAT32 = "float32"

    @property
    def register_count(self) -> int:
        return 1 if self in {DataType.INT16, DataType.UINT16} else 2


class Endian(StrEnum):
    BIG = "big"
    LITTLE = "little"


_STRUCT_FORMATS: Final = {
    DataType.INT16: ">h",
    DataType.UINT16: ">H",
    DataType.INT32: ">i",
    DataType.FLOAT32: ">f",
}
_INTEGER_LIMITS: Final = {
    DataType.INT16: (-0x8000, 0x7FFF),
    DataType.UINT16: (0, 0xFFFF),
    DataType.INT32: (-0x8000_0000, 0x7FFF_FFFF),
}
_FLOAT32_MAX: Final = 3.4028234663852886e38


@dataclass(frozen=True, slots=True)
class RegisterEncoding:
    """How a reading sits in registers: engineering value = raw × scale + offset.

    `byte_order` is the order of the two bytes inside each register, `word_order` the order of the
    registers of a 32-bit value (big = the most significant word at the lower address). Written with
    the bytes of the big-endian value A B C D: big/big = ABCD, big/little = CDAB, little/big = BADC,
    little/little = DCBA.
    """

    data_type: DataType
    byte_order: Endian = Endian.BIG
    word_order: Endian = Endian.BIG
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.scale == 0 or not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise ValueError(f"scale {self.scale} and offset {self.offset} must be finite, scale non-zero")
        if self.data_type.register_count == 1 and self.word_order is not Endian.BIG:
            raise ValueError(f"{self.data_type} fills one register: it has no word order")

    @property
    def register_count(self) -> int:
        return self.data_type.register_count

    @property
    def notation(self) -> str:
        """ABCD, CDAB, BADC, DCBA for 32-bit values; AB or BA for 16-bit ones."""
        letters = "ABCD"[: 2 * self.register_count]
        words = [letters[index : index + 2] for index in range(0, len(letters), 2)]
        if self.word_order is Endian.LITTLE:
            words.reverse()
        if self.byte_order is Endian.LITTLE:
            words = [word[::-1] for word in words]
        return "".join(words)

    def raw_value(self, value: float) -> int | float:
        """The number the registers hold for `value`; integer types saturate at their limits, as a
        transmitter's output does at the end of its span."""
        scaled = (value - self.offset) / self.scale
        if self.data_type is DataType.FLOAT32:
            return max(-_FLOAT32_MAX, min(_FLOAT32_MAX, scaled))
        low, high = _INTEGER_LIMITS[self.data_type]
        return max(low, min(high, round(scaled)))

    def encode(self, value: float) -> tuple[int, ...]:
        """The registers, in address order, that hold `value`."""
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite reading")
        big_endian = struct.pack(_STRUCT_FORMATS[self.data_type], self.raw_value(value))
        words = [big_endian[index : index + 2] for index in range(0, len(big_endian), 2)]
        if self.word_order is Endian.LITTLE:
            words.reverse()
        if self.byte_order is Endian.LITTLE:
            words = [word[::-1] for word in words]
        return tuple(int.from_bytes(word, "big") for word in words)
