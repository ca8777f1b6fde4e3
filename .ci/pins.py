"""Prints qjax's requirements pinned at their declared lower bounds, one ``name==version`` a
line: those of ``[project] dependencies`` and of each extra named on the command line.

``.ci/compat`` installs exactly these, so the lower bounds in pyproject.toml are what is
tested and cannot drift from it. A requirement without a ``>=`` lower bound (or with an
environment marker, which this does not evaluate) is refused: its lowest version would be
unknown. Run from anywhere: ``python .ci/pins.py demo test``.
"""

from __future__ import annotations

import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
REQUIREMENT = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*(?P<lower>[0-9][0-9A-Za-z.]*)\s*(,\s*<[^;]*)?"
)


def pins(extras: list[str]) -> list[str]:
    """``name==lower`` for every requirement of the project and of ``extras``."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"{PYPROJECT}: no extra {', '.join(unknown)} (has {', '.join(optional)})")
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += optional[extra]
    out = []
    for requirement in requirements:
        match = REQUIREMENT.fullmatch(requirement.strip())
        if match is None:
            raise SystemExit(
                f"{PYPROJECT}: requirement {requirement!r} has no '>=' lower bound that "
                ".ci/compat can install; declare one (an upper bound may follow: '>=1.2,<2')"
            )
        out.append(f"{match['name']}=={match['lower']}")
    return out


if __name__ == "__main__":
    print("\n".join(pins(sys.argv[1:])))
