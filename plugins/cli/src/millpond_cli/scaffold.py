"""`millpond new-pool NAME`: a pool plugin package that installs, is found, and passes the kit.

The template (millpond_cli/templates/pool/) is a complete distribution: a hatchling pyproject with
the `millpond.pools` entry point and the range of core versions it supports, a src layout with
py.typed, a pool that runs each job in a thread of its own, a README, and a test module that
subclasses the conformance kit. It is correct before its author changes a line, so the first
thing a plugin author sees is a green kit, and every change after that is checked by it.

Files are copied with `{{placeholder}}` substitution only (no template engine: the command line stays
free of that dependency); a `.tmpl` suffix keeps the templates out of linters and test discovery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from millpond import __version__
from millpond.config.plugins import FIRST_PARTY, POOLS
from millpond.exceptions import ConfigurationError

NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
#: template file names that are not their own output name
RENAMES = {"gitignore": ".gitignore"}


@dataclass(frozen=True, slots=True)
class CreatedPool:
    name: str
    distribution: str
    module: str
    class_name: str
    root: Path
    files: tuple[Path, ...]

    def summary(self) -> str:
        return "\n".join(
            [
                f"created {self.root}: the {self.name!r} pool ({self.distribution}, "
                f"class {self.module}.{self.class_name})",
                "next steps:",
                f"  pip install -e '{self.root}[test]'  (installs it with its entry point)",
                f"  millpond plugins  (lists {self.name!r} under pools)",
                f"  pytest {self.root}  (the conformance kit: green as generated)",
            ]
        )


def core_range(version: str) -> str:
    """The compatible range for plugins built against this core: same minor while 0.x."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    major, minor = parts[0], parts[1]
    if major == 0:
        return f">={major}.{minor},<{major}.{minor + 1}"
    return f">={major}.{minor},<{major + 1}"


def names(pool: str) -> dict[str, str]:
    """The placeholders for a pool name: `name`, `dist`, `module`, `class`, `core_range`."""
    if not NAME.match(pool):
        raise ConfigurationError(
            f"{pool!r} is not a usable pool name: use lower-case letters and digits, words "
            "separated by - or _, starting with a letter (e.g. trio, my-pool)"
        )
    if (POOLS, pool) in FIRST_PARTY:
        raise ConfigurationError(
            f"{pool!r} is the name of a first-party pool ({FIRST_PARTY[(POOLS, pool)]}): pick "
            "another name, so that both can be installed side by side"
        )
    words = re.split(r"[-_]", pool)
    return {
        "name": pool,
        "dist": "millpond-pool-" + "-".join(words),
        "module": "millpond_pool_" + "_".join(words),
        "class": "".join(w.capitalize() for w in words) + "Pool",
        "core_range": core_range(__version__),
    }


def _render(text: str, values: dict[str, str], where: str) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.search(r"\{\{\w+\}\}", text)
    if left:  # pragma: no cover - a template bug, caught by the scaffold test
        raise RuntimeError(f"template {where} uses an unknown placeholder {left.group(0)}")
    return text


def _walk(node: Traversable, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    out: list[tuple[tuple[str, ...], str]] = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            if child.name != "__pycache__":
                out += _walk(child, (*prefix, child.name))
        elif child.name.endswith(".tmpl"):
            out.append(((*prefix, child.name), child.read_text(encoding="utf-8")))
    return out


def create_pool(pool: str, directory: str | Path = ".") -> CreatedPool:
    """Write the package for `pool` into `directory/millpond-pool-<pool>/`; returns what it made."""
    values = names(pool)
    root = Path(directory) / values["dist"]
    if root.exists() and any(root.iterdir()):
        raise ConfigurationError(
            f"{root} already exists and is not empty: remove it, or pass another --dir"
        )
    template = files("millpond_cli").joinpath("templates", "pool")
    written: list[Path] = []
    for parts, text in _walk(template):
        out_parts = [values["module"] if p == "__module__" else p for p in parts]
        base = out_parts[-1].removesuffix(".tmpl")
        out_parts[-1] = RENAMES.get(base, base)
        target = root.joinpath(*out_parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_render(text, values, "/".join(parts)), encoding="utf-8")
        written.append(target)
    return CreatedPool(
        name=pool,
        distribution=values["dist"],
        module=values["module"],
        class_name=values["class"],
        root=root,
        files=tuple(written),
    )
