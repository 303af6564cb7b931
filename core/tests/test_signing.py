"""What a message signature covers: everything that decides what runs, what operators are shown and
where the result goes; and what it leaves out on purpose (headers brokers add, the trace context)."""

from __future__ import annotations

import pytest

from millpond.exceptions import SignatureError
from millpond.wire import signing
from millpond.wire.protocol import Message, encode_task

KEY = "k-0123456789"


def signed() -> Message:
    message = encode_task("shop.add", [1, 2], task_id="t-1")
    message.properties["reply_to"] = "results-queue"
    signing.sign(message, KEY)
    return message


def test_a_signed_message_verifies() -> None:
    signing.verify(signed(), KEY)
    assert signed().headers[signing.HEADER].startswith(signing.VERSION)


@pytest.mark.parametrize(
    "header",
    ["id", "task", "eta", "retries", "group", "argsrepr", "kwargsrepr", "shadow", "stamps"],
)
def test_altering_a_covered_header_breaks_the_signature(header: str) -> None:
    message = signed()
    message.headers[header] = "altered"
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(message, KEY)


@pytest.mark.parametrize("prop", ["reply_to", "correlation_id"])
def test_altering_where_the_result_goes_breaks_the_signature(prop: str) -> None:
    message = signed()
    message.properties[prop] = "someone-elses"
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(message, KEY)


def test_headers_brokers_add_and_the_trace_context_are_not_covered() -> None:
    message = signed()
    message.headers["x-death"] = [{"count": 1}]
    message.headers["x-millpond-death-reason"] = "replayed"
    message.headers["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    message.properties["priority"] = 9
    signing.verify(message, KEY)


def test_an_older_v1_signature_is_refused_with_what_to_do() -> None:
    message = signed()
    message.headers[signing.HEADER] = "v1=" + "0" * 64
    with pytest.raises(SignatureError, match="upgrade the producer"):
        signing.verify(message, KEY)
