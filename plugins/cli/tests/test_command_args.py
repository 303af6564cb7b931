"""The JSON-object flags of commands (`millpond send --kwargs`, `millpond control --args`): a
mistake is a usage error naming the flag, never a traceback."""

from __future__ import annotations

import pytest

from millpond.exceptions import ConfigurationError
from millpond_cli.command import json_object


def test_a_json_object_is_returned_as_given() -> None:
    assert json_object("--args", '{"terminate": true}', "{}") == {"terminate": True}


@pytest.mark.parametrize(
    ("text", "wanted"),
    [("{nope", "--args is not valid JSON"), ("[1]", "--args must be a JSON object, e.g. '{}'")],
)
def test_a_wrong_value_names_the_flag(text: str, wanted: str) -> None:
    with pytest.raises(ConfigurationError, match=wanted):
        json_object("--args", text, "{}")
