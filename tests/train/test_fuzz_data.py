"""Fuzzing the trainer's data reader with generated rows (hypothesis, derandomized and bounded): whatever a data
file holds, loading it never raises anything but a one-line LongseqError, and every non-blank line is either a
document or a bad row counted with its file:line."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longseq.errors import LongseqError
from longseq.train.data import TrainData

SETTINGS = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

surrogates = st.integers(0xD800, 0xDFFF).map(chr)
texts = st.text(st.one_of(st.characters(), surrogates, st.sampled_from("\n\r\t \u2028\ufeff")), max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), texts)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                      max_leaves=12)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": texts}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), values, max_size=3),
    values,
), max_size=4)
rows = st.one_of(
    values,
    st.fixed_dictionaries({"text": st.one_of(texts, values)}),
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"messages": messages}, optional={"text": texts, "meta": values}),
)


@st.composite
def lines(draw) -> bytes:
    kind = draw(st.sampled_from(["json", "json", "json", "nested", "bytes"]))
    if kind == "nested":  # nesting within a field, up to far past the parser's recursion limit
        depth = draw(st.integers(1, 5000))
        return ('{"text": "x", "meta": ' + "[" * depth + "]" * depth + "}").encode()
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    text = json.dumps(draw(rows), ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # unescaped lone surrogates become invalid UTF-8


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "rows.jsonl"


def non_blank_lines(content: bytes) -> set[int]:
    return {n for n, line in enumerate(content.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1) if line.strip()}


def check_one_line(e: LongseqError) -> str:
    message = str(e)
    assert "\n" not in message and message.strip(), message
    message.encode("utf-8")  # printable as it is: no lone surrogate copied from a row
    return message


@SETTINGS
@given(st.lists(lines(), max_size=8), st.integers(16, 400))
def test_any_rows_load_or_fail_in_one_line_with_every_bad_row_counted(tok, data_file, rows, max_row_bytes):
    content = b"\n".join(rows)
    data_file.write_bytes(content)
    expected = non_blank_lines(content)
    try:
        data = TrainData.load([data_file], tok, max_row_bytes=max_row_bytes)
    except LongseqError as e:
        message = check_one_line(e)
        assert message.startswith(f"no usable training documents in {data_file}"), message
        assert (f"{len(expected)} bad row(s)" in message) == bool(expected), message
    else:
        assert len(data.documents) + data.bad_rows.total == len(expected)
        sources = [d.source for d in data.documents] + [b.source for b in data.bad_rows.examples]
        assert all(s.rsplit(":", 1)[0] == str(data_file) for s in sources)
        lines_seen = [int(s.rsplit(":", 1)[1]) for s in sources]
        assert len(set(lines_seen)) == len(lines_seen) and set(lines_seen) <= expected
        for bad in data.bad_rows.examples:
            str(bad).encode("utf-8")

    try:
        TrainData.load([data_file], tok, on_bad_row="fail", max_row_bytes=max_row_bytes)
    except LongseqError as e:
        message = check_one_line(e)
        if expected and not message.startswith("no usable"):
            where, _, _ = message.partition(": ")
            assert where.rsplit(":", 1)[0] == str(data_file) and int(where.rsplit(":", 1)[1]) in expected, message
