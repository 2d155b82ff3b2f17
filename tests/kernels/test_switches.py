"""The BITNET_* switches: one rule for every value, one module reads them, and docs/switches.md lists them all."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from bitnet_dist.errors import ConfigError
from bitnet_dist.switches import SWITCHES, flag, markdown_table

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_one_rule_for_every_switch(name):
    default = SWITCHES[name][0]
    for unset in ({}, {name: ""}, {name: "  "}):
        assert flag(name, unset) is default
    for on in ("1", "true", "TRUE", "On", "yes", " 1 "):
        assert flag(name, {name: on}) is True
    for off in ("0", "false", "False", "OFF", "no"):
        assert flag(name, {name: off}) is False
    for bad in ("2", "enable", "y", "-1"):
        with pytest.raises(ConfigError) as e:
            flag(name, {name: bad})
        assert e.value.key == name and "true" in e.value.fix and "false" in e.value.fix


def test_unknown_switch_is_an_error():
    with pytest.raises(KeyError, match="not a BITNET_"):
        flag("BITNET_NO_SUCH_SWITCH", {})


def test_only_the_switches_module_reads_bitnet_variables():
    """Every BITNET_* switch is read through bitnet_dist.switches; a direct os.environ / os.getenv read of a
    BITNET_ name elsewhere in the package or the kernels would bring back a second parsing rule."""
    direct = re.compile(r"""(os\.environ(\.get)?\s*[\[(]\s*|os\.getenv\(\s*)["']BITNET_""")
    offenders = []
    for root in ("bitnet_dist", "kernels"):
        for f in sorted((REPO / root).rglob("*.py")):
            if f.name == "switches.py":
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if direct.search(line) and "STOP_FILE" not in line and "BITNET_CACHE" not in line:
                    offenders.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    # and every flag(...) call names a registered switch
    names = set()
    for root in ("bitnet_dist", "kernels"):
        for f in (REPO / root).rglob("*.py"):
            names |= set(re.findall(r"""flag\(\s*["'](BITNET_[A-Z_]+)["']""", f.read_text()))
    assert names and names <= set(SWITCHES), names - set(SWITCHES)


def test_docs_list_every_switch():
    page = (REPO / "docs" / "switches.md").read_text()
    assert markdown_table() in page, "docs/switches.md is out of date: paste bitnet_dist.switches.markdown_table()"
