"""Our gob bytes and Go-JSON install scripts, checked both ways against Go's own encoding/gob and encoding/json."""

from __future__ import annotations

import pytest
from conftest import GoGobError
from hypothesis import given, settings
from hypothesis import strategies as st

from kuiper_plugins.engine import gob
from kuiper_plugins.engine.kv import go_json_string, install_script

STRINGS = [
    pytest.param("", id="empty"),
    pytest.param("a", id="one-char"),
    pytest.param("random", id="word"),
    pytest.param("<b> & </b>", id="html"),
    pytest.param("say \"hi\" and 'bye' \\ back", id="quotes"),
    pytest.param("grüße, 函数, 🎉", id="non-ascii"),
    pytest.param("\x00\x01\t\n\x7f", id="control"),
    pytest.param("x" * 128, id="len-128"),
    pytest.param("é" * 40000, id="80000-bytes"),
]

LISTS = [
    pytest.param([], id="empty"),
    pytest.param(["f1"], id="one"),
    pytest.param(["f1", "f2", "f3"], id="three"),
    pytest.param([f"func{i}" for i in range(200)], id="200-items"),
    pytest.param(["函数", "straße", "ŝ", "🎉"], id="non-ascii"),
    pytest.param(["", "", "a"], id="empty-items"),
    pytest.param(["<f>", "a&b", 'q"uote'], id="html-quotes"),
    pytest.param(["y" * 300] * 300, id="90000-bytes"),
    pytest.param(["z" * 70000], id="one-70000-byte-item"),
]


@pytest.mark.parametrize("text", STRINGS)
def test_string_bytes_equal_gos_and_go_reads_ours(go_gob, text):
    ours = gob.encode_string(text)
    assert ours == go_gob.encode_string(text)
    assert go_gob.decode_string(ours) == text
    assert gob.decode_string(go_gob.encode_string(text)) == text


@pytest.mark.parametrize("items", LISTS)
def test_string_list_bytes_equal_gos_and_go_reads_ours(go_gob, items):
    ours = gob.encode_strings(items)
    assert ours == go_gob.encode_strings(items)
    assert go_gob.decode_strings(ours) == items
    assert gob.decode_strings(go_gob.encode_strings(items)) == items


def test_known_bytes_of_a_one_item_list():
    # What a fresh Go process writes for []string{"a"}: the type definition (id 64), then the value.
    assert gob.encode_strings(["a"]).hex() == "0b7f020102ff8000010c0000" + "06ff8000010161"
    assert gob.encode_string("abc").hex() == "060c0003616263"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=12))
def test_any_string_list_agrees_with_go(go_gob, items):
    assert gob.encode_strings(items) == go_gob.encode_strings(items)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_any_string_agrees_with_go(go_gob, text):
    assert gob.encode_string(text) == go_gob.encode_string(text)


# ---------------------------------------------------------------------------- other writers Go accepts


def _definition(type_id: int, name: str | None) -> bytes:
    """A []string type definition as another Go process could send it: any user id, a name or none."""
    body = gob._int(-type_id) + b"\x02\x01"
    if name is not None:
        body += b"\x01" + gob._string_field(name.encode()) + b"\x01"
    else:
        body += b"\x02"
    body += gob._int(type_id) + b"\x00\x01" + gob._int(gob.STRING_ID) + b"\x00\x00"
    return gob._message(body)


def _value(type_id: int, items: list[str]) -> bytes:
    body = b"".join(gob._string_field(item.encode()) for item in items)
    return gob._message(gob._int(type_id) + b"\x00" + gob._uint(len(items)) + body)


@pytest.mark.parametrize(("type_id", "name"), [(65, None), (300, None), (64, "[]string"), (77, "Functions")])
def test_lists_numbered_or_named_otherwise_are_read_as_go_reads_them(go_gob, type_id, name):
    # A long-running engine numbers []string after the types it met first; Go's decoder does not care.
    data = _definition(type_id, name) + _value(type_id, ["f1", "f2"])
    assert go_gob.decode_strings(data) == ["f1", "f2"]
    assert gob.decode_strings(data) == ["f1", "f2"]


# ---------------------------------------------------------------------------- refusals


def _slice_of_ints() -> bytes:
    definition = gob._message(gob._int(-64) + b"\x02\x01\x02" + gob._int(64) + b"\x00\x01" + gob._int(2) + b"\x00\x00")
    return definition + gob._message(gob._int(64) + b"\x00\x02\x02\x04")


@pytest.mark.parametrize(
    ("decoder", "data", "problem"),
    [
        pytest.param(gob.decode_string, b"", "no bytes", id="string-empty"),
        pytest.param(gob.decode_string, gob.encode_strings(["a"]), "type definition", id="string-given-a-list"),
        pytest.param(gob.decode_string, gob.encode_string("abc")[:-1], "more bytes", id="string-truncated"),
        pytest.param(gob.decode_string, gob.encode_string("abc") + b"\x00", "after the value", id="string-trailing"),
        pytest.param(gob.decode_string, bytes.fromhex("03040002"), "not a string", id="an-int"),
        pytest.param(gob.decode_string, bytes.fromhex("040c000180"), "not UTF-8", id="string-bad-utf8"),
        pytest.param(gob.decode_strings, b"", "no bytes", id="list-empty"),
        pytest.param(gob.decode_strings, gob.encode_string("a"), "user type", id="list-given-a-string"),
        pytest.param(gob.decode_strings, _slice_of_ints(), "not of strings", id="list-of-ints"),
        pytest.param(gob.decode_strings, gob.encode_strings(["a"])[:12], "no value", id="list-without-value"),
        pytest.param(gob.decode_strings, gob.encode_strings(["ab"])[:-1], "more bytes", id="list-truncated"),
        pytest.param(gob.decode_strings, gob.encode_strings([]) + b"\x01", "after the value", id="list-trailing"),
        pytest.param(
            gob.decode_strings, _definition(64, None) + _value(65, ["a"]), "not of the defined", id="list-other-id"
        ),
    ],
)
def test_anything_else_is_refused_with_a_clear_error(decoder, data, problem):
    with pytest.raises(gob.GobError, match=problem) as caught:
        decoder(data)
    assert str(caught.value).startswith("not a gob-encoded ")


def test_go_refuses_what_we_refuse_as_the_wrong_type(go_gob):
    with pytest.raises(GoGobError, match="decoding into local type \\*string"):
        go_gob.decode_string(gob.encode_strings(["a"]))
    with pytest.raises(GoGobError, match="decoding into local type \\*\\[\\]string"):
        go_gob.decode_strings(_slice_of_ints())


def _flip(data: bytes, index: int, byte: int) -> bytes:
    return data[:index] + bytes([byte]) + data[index + 1 :]


GOOD_STREAMS = st.sampled_from([gob.encode_strings(["f1", "f2"]), gob.encode_string("abc")])
DAMAGED = st.builds(_flip, GOOD_STREAMS, st.integers(0, 20), st.integers(0, 255))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | DAMAGED)
def test_any_bytes_give_a_value_or_a_gob_error(data):
    for decoder in (gob.decode_string, gob.decode_strings):
        try:
            decoder(data)
        except gob.GobError:
            pass


@pytest.mark.parametrize("value", ["\ud800", ["ok", "\udfff"]])
def test_text_go_cannot_hold_as_utf8_is_not_encoded(value):
    encode = gob.encode_string if isinstance(value, str) else gob.encode_strings
    with pytest.raises(gob.GobError, match="lone surrogate"):
        encode(value)


@pytest.mark.parametrize("value", ["f1", b"f1", 3, None])
def test_a_list_must_be_a_list(value):
    with pytest.raises(gob.GobError, match="expected a list of strings"):
        gob.encode_strings(value)


# ---------------------------------------------------------------------------- Go's json.Marshal of IOPlugin

IOPLUGINS = [
    pytest.param("random", "http://127.0.0.1:8080/random.zip", None, id="plain"),
    pytest.param("random", "http://127.0.0.1/random.zip", [], id="empty-shellParas-left-out"),
    pytest.param("sql", "https://example.invalid/sql.zip", ["mysql", "-v"], id="shellParas"),
    pytest.param("a<b>", "http://h/x.zip?a=1&b=2", ["<p>", "&amp;"], id="html-escaped"),
    pytest.param('q"uote', "file:///tmp/back\\slash.zip", ["'single'"], id="quotes-backslash"),
    pytest.param("函数", "http://h/grüße.zip", ["🎉"], id="non-ascii"),
    pytest.param("ctl", "http://h/\x01\x1f\n\r\t.zip", ["\x7f"], id="control"),
    pytest.param("ls", "http://h/\u2028\u2029.zip", None, id="line-separators"),
]


@pytest.mark.parametrize(("name", "file", "paras"), IOPLUGINS)
def test_install_script_equals_go_json_marshal(go_gob, name, file, paras):
    go_json, go_gob_bytes = go_gob.marshal_ioplugin(name, file, paras)
    ours = install_script(name, file, paras or ())
    assert ours == go_json
    assert gob.encode_string(ours) == go_gob_bytes


def test_backspace_and_form_feed_as_go_1_22_and_later_write_them(go_gob):
    # eKuiper 2.x is built with Go >= 1.22, which writes \b and \f; older Go wrote \u0008 and \u000c.
    ours = install_script("bf", "http://h/\b\f.zip")
    assert ours == '{"name":"bf","file":"http://h/\\b\\f.zip"}'
    if go_gob.version >= (1, 22):
        assert ours == go_gob.marshal_ioplugin("bf", "http://h/\b\f.zip", None)[0]


def test_field_order_and_escapes_match_known_go_output():
    assert install_script("a&b", "http://h/<x>.zip", ["-y"]) == (
        '{"name":"a\\u0026b","file":"http://h/\\u003cx\\u003e.zip","shellParas":["-y"]}'
    )
    assert go_json_string("\ud800") == '"\ufffd"'  # Go writes invalid UTF-8 as the replacement character


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=30), st.text(max_size=60), st.one_of(st.none(), st.lists(st.text(max_size=10), max_size=3)))
def test_any_install_script_agrees_with_go(go_gob, name, file, paras):
    if go_gob.version < (1, 22):
        name, file = (t.replace("\b", "").replace("\f", "") for t in (name, file))
        paras = [p.replace("\b", "").replace("\f", "") for p in paras] if paras else paras
    assert install_script(name, file, paras or ()) == go_gob.marshal_ioplugin(name, file, paras)[0]
