"""Go `encoding/gob` for the two values eKuiper keeps in its plugin tables: a string and a []string.

This is not a gob library. It writes exactly the bytes a fresh
``gob.NewEncoder(&buf).Encode(value)`` writes for a Go ``string`` or
``[]string``, and reads back such a stream (one value, nothing after it);
anything else is refused with `GobError`.

The wire format, as far as these two values need it:

- Every message is ``uint(length) payload``; a payload starts with the
  signed type id of what follows. A negative id defines a type, a positive
  one carries a value of it.
- Unsigned integers below 128 are one byte; larger ones are their minimal
  big-endian bytes after one byte holding the negated byte count (0xFF for
  one byte, 0xFE for two ...). Signed integers are folded into unsigned
  ones: ``n << 1`` for n >= 0, ``(~n << 1) | 1`` for n < 0.
- A top-level value that is not a struct is sent as a "singleton": a 0
  byte, then the value. A string is ``uint(len) utf8-bytes``; a slice is
  ``uint(count)`` then its elements.
- ``string`` has the built-in id 6 and needs no definition. ``[]string``
  does: Go sends, before the value, a ``wireType`` whose only field set is
  ``SliceT`` (field delta 2), holding ``CommonType{Id}`` (the name is empty
  for an unnamed type and left out) and ``Elem: 6``. A fresh Go process
  hands out 64, its first user type id, so Go's bytes for ``[]string{"a"}``
  are ``0b 7f 02 01 02 ff80 00 01 0c 00 00`` then ``06 ff80 00 01 01 61``.
  A long-running engine may have numbered ``[]string`` differently, so the
  decoder takes any user id, as Go's decoder does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

STRING_ID = 6
FIRST_USER_ID = 64

# Field numbers are sent as deltas from the previous field, starting at -1.
_WIRE_SLICE_DELTA = 2  # wireType: ArrayT=0, SliceT=1, ...
_COMMON_NAME_DELTA = 1  # CommonType: Name=0, Id=1
_COMMON_ID_DELTA = 2
_FIELD_NEXT = 1


class GobError(ValueError):
    """The bytes are not one gob-encoded string or []string, or a value cannot be encoded as one."""


# ---------------------------------------------------------------------------- encoding


def _uint(n: int) -> bytes:
    if n < 0:
        raise GobError(f"cannot encode {n} as an unsigned gob integer")
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([256 - len(body)]) + body


def _int(n: int) -> bytes:
    return _uint(n << 1 if n >= 0 else ((~n) << 1) | 1)


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise GobError(f"expected a string, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GobError(f"string is not valid Unicode (lone surrogate at {exc.start})") from None


def _message(payload: bytes) -> bytes:
    return _uint(len(payload)) + payload


def _string_field(data: bytes) -> bytes:
    return _uint(len(data)) + data


def encode_string(text: str) -> bytes:
    """Return the gob stream Go writes for the string `text`."""
    return _message(_int(STRING_ID) + b"\x00" + _string_field(_utf8(text)))


def encode_strings(items: Sequence[str]) -> bytes:
    """Return the gob stream a fresh Go encoder writes for the []string `items`."""
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise GobError(f"expected a list of strings, got {type(items).__name__}")
    definition = _message(
        _int(-FIRST_USER_ID)
        + _uint(_WIRE_SLICE_DELTA)
        + _uint(_FIELD_NEXT)  # sliceType.CommonType
        + _uint(_COMMON_ID_DELTA)
        + _int(FIRST_USER_ID)
        + b"\x00"  # end of CommonType
        + _uint(_FIELD_NEXT)  # sliceType.Elem
        + _int(STRING_ID)
        + b"\x00"  # end of sliceType
        + b"\x00"  # end of wireType
    )
    body = b"".join(_string_field(_utf8(item)) for item in items)
    return definition + _message(_int(FIRST_USER_ID) + b"\x00" + _uint(len(items)) + body)


# ---------------------------------------------------------------------------- decoding


class _Reader:
    """A cursor over a byte string that refuses to read past its end."""

    def __init__(self, data: bytes, what: str):
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, problem: str) -> GobError:
        return GobError(f"not a gob-encoded {self.what}: {problem} (at byte {self.pos})")

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def take(self, count: int) -> bytes:
        if count > len(self.data) - self.pos:
            raise self.fail(f"needs {count} more bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def uint(self) -> int:
        first = self.take(1)[0]
        if first < 0x80:
            return first
        count = 256 - first
        if count > 8:
            raise self.fail(f"integer of {count} bytes")
        return int.from_bytes(self.take(count), "big")

    def int(self) -> int:
        folded = self.uint()
        return ~(folded >> 1) if folded & 1 else folded >> 1

    def expect_uint(self, wanted: int, meaning: str) -> None:
        start = self.pos
        got = self.uint()
        if got != wanted:
            self.pos = start
            raise self.fail(f"expected {meaning} ({wanted}), found {got}")

    def message(self) -> _Reader:
        length = self.uint()
        if length == 0:
            raise self.fail("empty message")
        return _Reader(self.take(length), self.what)

    def text(self) -> str:
        raw = self.take(self.uint())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"string is not UTF-8 ({exc.reason})") from None


def _finish(outer: _Reader, inner: _Reader) -> None:
    if not inner.at_end():
        raise inner.fail(f"{len(inner.data) - inner.pos} unread bytes in the message")
    if not outer.at_end():
        raise outer.fail(f"{len(outer.data) - outer.pos} bytes after the value")


def decode_string(data: bytes) -> str:
    """Return the string held in one gob stream written by Go; raise GobError for anything else."""
    outer = _Reader(bytes(data), "string")
    if outer.at_end():
        raise outer.fail("no bytes")
    message = outer.message()
    type_id = message.int()
    if type_id != STRING_ID:
        kind = "a type definition" if type_id < 0 else f"a value of type id {type_id}"
        raise message.fail(f"starts with {kind}, not a string (type id {STRING_ID})")
    message.expect_uint(0, "the singleton marker")
    value = message.text()
    _finish(outer, message)
    return value


def decode_strings(data: bytes) -> list[str]:
    """Return the []string held in one gob stream written by Go; raise GobError for anything else."""
    outer = _Reader(bytes(data), "[]string")
    if outer.at_end():
        raise outer.fail("no bytes")
    definition = outer.message()
    defined = -definition.int()
    if defined < FIRST_USER_ID:
        raise definition.fail("does not start with the definition of a user type")
    definition.expect_uint(_WIRE_SLICE_DELTA, "a slice type")
    definition.expect_uint(_FIELD_NEXT, "the slice's common type")
    delta = definition.uint()
    if delta == _COMMON_NAME_DELTA:  # a name: Go leaves it out for []string, other writers may not
        definition.text()
        delta = _COMMON_ID_DELTA if definition.uint() == _FIELD_NEXT else None
    if delta != _COMMON_ID_DELTA:
        raise definition.fail("expected the type id of the slice")
    if definition.int() != defined:
        raise definition.fail("the slice type names another id than the one it defines")
    definition.expect_uint(0, "the end of the common type")
    definition.expect_uint(_FIELD_NEXT, "the slice's element type")
    element = definition.int()
    if element != STRING_ID:
        raise definition.fail(f"a slice of type id {element}, not of strings")
    definition.expect_uint(0, "the end of the slice type")
    definition.expect_uint(0, "the end of the type definition")
    if not definition.at_end():
        raise definition.fail("unread bytes in the type definition")
    if outer.at_end():
        raise outer.fail("a type definition but no value")
    message = outer.message()
    type_id = message.int()
    if type_id != defined:
        raise message.fail(f"a value of type id {type_id}, not of the defined []string ({defined})")
    message.expect_uint(0, "the singleton marker")
    count = message.uint()
    if count > len(message.data):  # each element takes at least one byte
        raise message.fail(f"claims {count} elements in {len(message.data)} bytes")
    values = [message.text() for _ in range(count)]
    _finish(outer, message)
    return values
