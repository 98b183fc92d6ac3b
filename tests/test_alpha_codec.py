"""The Alpha sign codec (drivers/alpha_codec.py) against the golden packets, and the simulator's own
parser (firmware_sim/alpha_sign.py) against the same bytes: two independent readings of the spec must
agree on every byte (docs/protocol.md §4)."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from datetime import date, time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from drivers import alpha_codec as codec
from firmware_sim.alpha_sign import (
    STATUS_CHECKSUM,
    STATUS_OK,
    Allocation,
    Command,
    Frame,
    FrameReader,
    LineCounters,
    SignConfig,
    SimulatedSign,
)

GOLDEN = Path(__file__).parent / "golden" / "alpha"
SIGN = "01"


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def packet(*commands: bytes, address: str = SIGN) -> bytes:
    return codec.encode_packet(address, *commands)


# The specification's examples are all written to every sign ("Z00"); all but the 01FB one go without
# a checksum (tests/golden/alpha/README.md says which bytes are quoted and which assumed).
SPEC_ADDRESS = "00"


def spec_packet(command: bytes, *, with_checksum: bool = False) -> bytes:
    return codec.encode_packet(SPEC_ADDRESS, command, with_checksum=with_checksum)


TINY_PICTURE = codec.DotsPicture(("01110", "10001", "01110"))

REQUESTS: dict[str, Callable[[], bytes]] = {
    "spec-f-write-text-hello.bin": lambda: spec_packet(
        codec.write_text("A", b"HELLO", mode=None), with_checksum=True
    ),
    "spec-f-write-text-hello-no-checksum.bin": lambda: spec_packet(
        codec.write_text("A", b"HELLO", mode=None)
    ),
    "spec-f-write-text-d-rotate-bottom.bin": lambda: spec_packet(
        codec.write_text("D", b"HELLO", position=codec.Position.BOTTOM, mode=codec.Mode.ROTATE)
    ),
    "spec-d-configure-text-and-string.bin": lambda: spec_packet(
        codec.configure_memory(
            [
                codec.FileAllocation("A", codec.FileKind.TEXT, size=0x400),
                codec.FileAllocation("1", codec.FileKind.STRING, size=0x20),
            ]
        )
    ),
    "spec-d-write-string-1.bin": lambda: spec_packet(codec.write_string("1", b"364")),
    "profile-priority-text.bin": lambda: packet(
        codec.write_text("0", codec.coloured(b"FLOOD: LEAVE NOW", codec.Colour.RED), mode=codec.Mode.ROTATE)
    ),
    "profile-release-priority.bin": lambda: packet(codec.release_priority()),
    "profile-programme-text.bin": lambda: packet(
        codec.write_text("A", b"Welcome to ward 5", mode=codec.Mode.ROTATE)
    ),
    "profile-set-time-of-day.bin": lambda: packet(codec.set_time_of_day(14, 30)),
    "profile-set-date.bin": lambda: packet(codec.set_date(date(2026, 11, 24))),
    "profile-set-day-of-week.bin": lambda: packet(codec.set_day_of_week(date(2026, 11, 24))),
    "profile-read-time-of-day.bin": lambda: packet(codec.read_special(codec.SpecialLabel.TIME_OF_DAY)),
    "profile-read-general-information.bin": lambda: packet(
        codec.read_special(codec.SpecialLabel.GENERAL_INFORMATION)
    ),
    "profile-read-text-a.bin": lambda: packet(codec.read_text("A")),
    "profile-clear-memory.bin": lambda: packet(codec.clear_memory()),
    "profile-configure-memory.bin": lambda: packet(
        codec.configure_memory(
            [
                codec.FileAllocation("A", codec.FileKind.TEXT, size=256),
                codec.FileAllocation("6", codec.FileKind.DOTS, height=16, width=240),
            ]
        )
    ),
    "profile-small-dots-picture.bin": lambda: packet(codec.write_small_dots("6", TINY_PICTURE)),
    "profile-priority-picture-call.bin": lambda: packet(codec.write_text("0", codec.picture_calls("6"))),
}


def test_every_golden_file_is_checked() -> None:
    replies = {"reply-ack.bin", "reply-nak-checksum.bin", "reply-time-of-day.bin"}
    assert {path.name for path in GOLDEN.glob("*.bin")} == set(REQUESTS) | replies


def test_the_spec_checksum_example() -> None:
    # Appendix F: <STX>AAHELLO<ETX> sums to 01FB.
    assert codec.checksum(b"\x02AAHELLO\x03") == b"01FB"
    assert golden("spec-f-write-text-hello.bin").endswith(b"\x0301FB\x04")


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_the_encoder_produces_the_golden_packets(name: str) -> None:
    assert REQUESTS[name]() == golden(name)


@pytest.mark.parametrize("name", sorted(name for name in REQUESTS if name.startswith("profile-")))
def test_the_simulator_parses_the_golden_packets(name: str) -> None:
    counters = LineCounters()
    frames = FrameReader(counters).feed(golden(name))
    assert len(frames) == 1
    (frame,) = frames
    assert frame.type_code == "Z"
    assert frame.address == SIGN
    assert all(command.checksum_ok for command in frame.commands)
    assert counters.garbage_bytes == counters.partial_frames == counters.malformed_frames == 0


def _spec_frame(code: str, data: bytes, *, checksum_ok: bool | None = None) -> Frame:
    return Frame(type_code="Z", address=SPEC_ADDRESS, commands=(Command(code, data, checksum_ok),))


# What each of the specification's examples means, as the simulator's own reader must see it:
# `checksum_ok` is True where the example carries a checksum, None where it carries none.
SPEC_FRAMES: dict[str, Frame] = {
    "spec-f-write-text-hello.bin": _spec_frame("A", b"AHELLO", checksum_ok=True),
    "spec-f-write-text-hello-no-checksum.bin": _spec_frame("A", b"AHELLO"),
    "spec-f-write-text-d-rotate-bottom.bin": _spec_frame("A", b"D\x1b&aHELLO"),
    "spec-d-configure-text-and-string.bin": _spec_frame("E", b"$AAU0400FF001BL00200000"),
    "spec-d-write-string-1.bin": _spec_frame("G", b"1364"),
}


def test_every_spec_golden_file_has_its_meaning_written_down() -> None:
    assert set(SPEC_FRAMES) == {name for name in REQUESTS if name.startswith("spec-")}


@pytest.mark.parametrize("name", sorted(SPEC_FRAMES))
def test_the_simulator_reads_each_spec_example_as_the_spec_means_it(name: str) -> None:
    counters = LineCounters()
    assert FrameReader(counters).feed(golden(name)) == [SPEC_FRAMES[name]]
    assert counters.garbage_bytes == counters.partial_frames == counters.malformed_frames == 0


def _broadcast(sign: SimulatedSign, data: bytes) -> None:
    """Hands a packet to `sign` as the line does a broadcast: executed, never answered."""
    (frame,) = FrameReader(LineCounters()).feed(data)
    assert sign.accepts(frame)
    assert sign.handle(frame, answer=False) == []
    assert sign.counters.naks == 0


@pytest.mark.parametrize("name", ["spec-f-write-text-hello.bin", "spec-f-write-text-hello-no-checksum.bin"])
def test_the_spec_hello_shows_hello_with_or_without_its_checksum(name: str) -> None:
    sign = SimulatedSign(SignConfig(SIGN), clock=lambda: 0.0)
    _broadcast(sign, golden(name))  # TEXT file A needs no memory configuration
    assert sign.text_file("A") == b"HELLO"
    assert sign.current_text() == "HELLO"


def test_the_spec_rotate_example_writes_text_file_d_at_the_bottom_in_rotate() -> None:
    sign = SimulatedSign(SignConfig(SIGN), clock=lambda: 0.0)
    allocate_d = codec.configure_memory([codec.FileAllocation("D", codec.FileKind.TEXT, size=64)])
    _broadcast(sign, spec_packet(allocate_d))
    _broadcast(sign, golden("spec-f-write-text-d-rotate-bottom.bin"))
    assert sign.text_file("D") == b"\x1b&aHELLO"  # ESC, bottom line (26H), ROTATE (61H)
    assert sign.current_text() == "HELLO"


def test_the_spec_string_example_allocates_updates_and_shows_string_1() -> None:
    sign = SimulatedSign(SignConfig(SIGN), clock=lambda: 0.0)
    _broadcast(sign, golden("spec-d-configure-text-and-string.bin"))
    assert sign.allocations == (
        Allocation("A", "A", locked=False, size=0x400, height=0, width=0, qualifier="FF00"),
        Allocation("1", "B", locked=True, size=0x20, height=0, width=0, qualifier="0000"),
    )
    # Between the spec's steps 1 and 3, TEXT file A calls STRING file 1 (10H "1"); our own bytes.
    _broadcast(sign, spec_packet(codec.write_text("A", bytes([codec.CALL_STRING]) + b"1")))
    _broadcast(sign, golden("spec-d-write-string-1.bin"))
    assert sign.current_text() == "364"


def _configured_sign(now: list[float] | None = None) -> SimulatedSign:
    clock = now if now is not None else [0.0]
    sign = SimulatedSign(SignConfig(SIGN), clock=lambda: clock[0])
    (frame,) = FrameReader(LineCounters()).feed(golden("profile-configure-memory.bin"))
    assert sign.handle(frame, answer=True) == [golden("reply-ack.bin")]
    return sign


@pytest.mark.parametrize("name", sorted(name for name in REQUESTS if name.startswith("profile-")))
def test_the_simulator_accepts_the_golden_packets(name: str) -> None:
    sign = _configured_sign()
    (frame,) = FrameReader(LineCounters()).feed(golden(name))
    replies = sign.handle(frame, answer=True)
    assert len(replies) == 1
    assert replies[0] == golden("reply-ack.bin") or replies[0].startswith(b"\x00" * 5 + b"\x01000\x02")
    assert sign.counters.naks == 0


def test_the_simulator_answers_the_time_read_byte_for_byte() -> None:
    sign = _configured_sign()
    reader = FrameReader(LineCounters())
    (set_time,) = reader.feed(golden("profile-set-time-of-day.bin"))
    sign.handle(set_time, answer=True)
    (read_time,) = reader.feed(golden("profile-read-time-of-day.bin"))
    assert sign.handle(read_time, answer=True) == [golden("reply-time-of-day.bin")]


def test_the_simulator_keeps_what_the_golden_packets_write() -> None:
    sign = _configured_sign()
    reader = FrameReader(LineCounters())
    for name in ("profile-programme-text.bin", "profile-small-dots-picture.bin", "profile-priority-text.bin"):
        for frame in reader.feed(golden(name)):
            sign.handle(frame, answer=True)
    assert sign.text_file("A") == b"\x1b aWelcome to ward 5"
    assert sign.current_text() == "FLOOD: LEAVE NOW"
    assert sign.picture("6") is not None
    assert sign.picture("6").rows == TINY_PICTURE.rows  # type: ignore[union-attr]
    for frame in reader.feed(golden("profile-release-priority.bin")):
        sign.handle(frame, answer=True)
    assert sign.current_text() == "Welcome to ward 5"


def test_a_corrupted_packet_is_refused_for_its_checksum() -> None:
    sign = _configured_sign()
    corrupted = bytearray(golden("profile-programme-text.bin"))
    corrupted[corrupted.index(b"ward")] ^= 0x01
    (frame,) = FrameReader(LineCounters()).feed(bytes(corrupted))
    assert frame.commands[0].checksum_ok is False
    assert sign.handle(frame, answer=True) == [golden("reply-nak-checksum.bin")]
    assert sign.counters.bad_checksums == 1
    assert sign.text_file("A") is None


def test_the_reader_resynchronises_on_garbage_and_cut_off_frames() -> None:
    counters = LineCounters()
    reader = FrameReader(counters)
    hello = golden("spec-f-write-text-hello.bin")
    noise = b"\xff\x7fnoise"
    cut_off = hello[: len(hello) // 2]
    stream = noise + cut_off + hello + b"\x00\x01Z01\x15" + hello
    frames = [frame for byte in stream for frame in reader.feed(bytes([byte]))]  # one byte at a time
    assert len(frames) == 2
    assert counters.garbage_bytes == len(noise)
    assert counters.partial_frames == 1  # the cut-off frame, ended by the next SOH
    assert counters.malformed_frames == 1  # a header without STX
    reader.feed(cut_off)
    reader.abandon()  # the line went quiet mid-frame
    assert counters.partial_frames == 2


def test_the_decoder_reads_the_golden_replies_in_any_chunks() -> None:
    stream = golden("reply-ack.bin") + golden("reply-time-of-day.bin") + golden("reply-nak-checksum.bin")
    decoder = codec.ReplyDecoder()
    items = [item for byte in stream for item in decoder.feed(bytes([byte]))]
    assert items[0] == codec.Acknowledged(0x40)
    assert isinstance(items[1], codec.ResponsePacket)
    assert codec.parse_time_of_day(items[1]) == time(14, 30)
    assert items[2] == codec.Refused(0x50)
    assert items[2].flags == (codec.StatusFlag.CHECKSUM,)
    assert not decoder.pending


def test_the_decoder_reports_garbage_and_never_mistakes_noise_for_an_ack() -> None:
    decoder = codec.ReplyDecoder()
    reply = golden("reply-time-of-day.bin")
    bad_sum = reply.replace(b"0132", b"0133")
    items = decoder.feed(b"junk\x06\x01" + reply[6:12] + b"\x00" + reply + bad_sum + b"\x06")
    garbage = [item for item in items if isinstance(item, codec.Garbage)]
    replies = [item for item in items if not isinstance(item, codec.Garbage)]
    assert len(replies) == 1
    assert isinstance(replies[0], codec.ResponsePacket)
    reasons = " | ".join(item.reason for item in garbage)
    assert "outside any reply" in reasons
    assert "cut off by a new SOH" in reasons
    assert "checksum 0133" in reasons
    assert decoder.pending  # the trailing 06H still waits for its status byte
    assert decoder.reset() == [codec.Garbage(b"\x06", "bytes outside any reply")]


def test_replies_that_answer_another_question_are_refused() -> None:
    decoder = codec.ReplyDecoder()
    (response,) = decoder.feed(golden("reply-time-of-day.bin"))
    assert isinstance(response, codec.ResponsePacket)
    with pytest.raises(codec.ReplyError, match="answered about"):
        codec.parse_date(response)


@pytest.mark.parametrize("revision", ["A", ""])
def test_general_information_is_read_from_both_ends(revision: str) -> None:
    body = f'E"WCSIM-01{revision}11261430M004000,023E'.encode()
    response = codec.ResponsePacket("0", "00", "E", body[1:])
    info = codec.parse_general_information(response)
    assert (info.firmware_version, info.firmware_revision, info.firmware_released) == (
        "WCSIM-01",
        revision,
        "11/26",
    )
    assert (info.clock, info.time_format, info.speaker_enabled) == (time(14, 30), "24 hour", True)
    assert (info.memory_total, info.memory_free) == (0x4000, 0x023E)


def test_bad_fields_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="priority text"):
        codec.write_text("0", b"X" * 126)
    with pytest.raises(ValueError, match="file label"):
        codec.write_text("?", b"X")
    with pytest.raises(ValueError, match="sign address"):
        codec.encode_packet("1", b"AA")
    with pytest.raises(ValueError, match="hour"):
        codec.set_time_of_day(24, 0)
    with pytest.raises(ValueError, match="allocation label '0'"):
        codec.FileAllocation("0", codec.FileKind.TEXT, size=10)
    with pytest.raises(ValueError, match="a label appears twice"):
        codec.configure_memory([codec.FileAllocation("A", codec.FileKind.TEXT, size=1)] * 2)
    with pytest.raises(ValueError, match="headline"):
        codec.sign_text("Cảnh báo", field="headline")
    with pytest.raises(ValueError, match="picture row 1"):
        codec.DotsPicture(("01", "0x"))


def test_ascii_goes_as_text_and_vietnamese_as_a_picture() -> None:
    assert codec.is_sign_text("FLOOD: LEAVE NOW")
    assert not codec.is_sign_text("Cảnh báo lũ")
    assert not codec.is_sign_text("tab\there")


def test_a_vietnamese_picture_is_the_same_from_composed_and_decomposed_text() -> None:
    text = "Cảnh báo lũ: sơ tán khỏi tổ 5"
    picture = codec.render_picture(text, height=16)
    assert picture.height == 16
    assert 100 < picture.width <= 255
    assert picture.lit_dots > 200
    assert set("".join(picture.rows)) == {"0", "1"}
    assert codec.render_picture(unicodedata.normalize("NFD", text), height=16) == picture
    # The diacritics are drawn: the same letters without them light fewer dots.
    assert codec.render_picture("Canh bao lu: so tan khoi to 5", height=16).lit_dots < picture.lit_dots


def test_long_text_is_cut_into_pages_between_words() -> None:
    text = "DIỄN TẬP: Cảnh báo lũ: sơ tán khỏi tổ 5 ngay bây giờ"
    pages = codec.render_pages(text, height=16, page_width=120, max_pages=4, colour=codec.Colour.AMBER)
    assert len(pages) > 1
    assert all(page.width <= 120 for page in pages)
    assert {"3"} < set("".join(pages[0].rows))
    with pytest.raises(ValueError, match="needs"):
        codec.render_pages(text, height=16, page_width=40, max_pages=2)


VIETNAMESE_LETTERS = (
    "aàáảãạăằắẳẵặâầấẩẫậbcdđeèéẻẽẹêềếểễệghiìíỉĩịklmnoòóỏõọôồốổỗộơờớởỡợpqrstuùúủũụưừứửữựvxyỳýỷỹỵ"
)


@pytest.mark.parametrize("case", ["lower", "upper"])
def test_the_bundled_font_has_every_vietnamese_letter(case: str) -> None:
    font = ImageFont.truetype(str(codec.BUNDLED_FONT), 24, layout_engine=ImageFont.Layout.BASIC)

    def drawn(char: str) -> bytes:
        canvas = Image.new("L", (40, 40), 0)
        ImageDraw.Draw(canvas).text((4, 4), char, font=font, fill=255)
        return canvas.tobytes()

    missing_glyph = drawn("\U000f0000")  # a private-use code point: what the font draws for no glyph
    letters = VIETNAMESE_LETTERS if case == "lower" else VIETNAMESE_LETTERS.upper()
    missing = [letter for letter in letters if drawn(letter) == missing_glyph]
    assert missing == []
    assert drawn("\U000f0000") != drawn("ệ")


def test_the_font_ships_with_its_licence() -> None:
    licence = (codec.FONT_DIRECTORY / "LICENSE-DejaVu.txt").read_text(encoding="utf-8")
    assert "Bitstream Vera Fonts Copyright" in licence
    assert "Arev Fonts Copyright" in licence
    assert codec.BUNDLED_FONT.stat().st_size > 100_000


def test_status_flags_name_each_bit() -> None:
    assert codec.status_flags(STATUS_OK | STATUS_CHECKSUM) == (codec.StatusFlag.CHECKSUM,)
    assert codec.status_flags(0x60) == (codec.StatusFlag.ILLEGAL_COMMAND_OR_LABEL,)
    assert codec.status_flags(0x40) == ()
