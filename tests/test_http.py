"""Connections and HTTP heads facing strangers: sizes, timeouts, budgets, slow readers (loopback only)."""

import asyncio

import pytest

import meshbox


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def parse_head(data):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await meshbox.read_http_request(reader)


def status_of(data):
    with pytest.raises(meshbox.HttpError) as refused:
        run(parse_head(data))
    return refused.value.status


# ---- request heads ----

def test_header_line_over_the_limit_is_refused():
    line = b"X-Big: " + b"a" * meshbox.MAX_HEADER_LINE + b"\r\n"
    assert status_of(b"GET / HTTP/1.1\r\n" + line + b"\r\n") == 431
    fits = b"X-Big: " + b"a" * (meshbox.MAX_HEADER_LINE - 20) + b"\r\n"
    assert run(parse_head(b"GET / HTTP/1.1\r\n" + fits + b"\r\n")).headers["x-big"].startswith("aaa")


def test_request_line_over_the_limit_is_refused():
    assert status_of(b"GET /" + b"a" * meshbox.MAX_HEADER_LINE + b" HTTP/1.1\r\n\r\n") == 431


def test_request_head_total_is_limited():
    # Each line fits, but together they pass the head's limit.
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"a" * (meshbox.MAX_HEADER_LINE - 16))
                     for i in range(meshbox.MAX_HEADERS))
    assert len(lines) > meshbox.MAX_REQUEST_HEAD
    assert status_of(b"GET / HTTP/1.1\r\n" + lines + b"\r\n") == 431
