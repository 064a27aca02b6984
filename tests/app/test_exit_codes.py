"""The exit codes: docs/cli.md's table is `ExitCode` row for row, and each error type ends the
command with the code of its most specific type in the table."""

import re

import pytest

from xpcnn.app.exit_codes import ExitCode, exit_code_for
from xpcnn.errors import CheckpointError, CheckpointWriteError, ConfigError, XpcnnError

from helpers import REPO


def _documented_table() -> list[tuple[int, str]]:
    """The rows ``| code | meaning |`` of the table under docs/cli.md's "Errors and exit codes"."""
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text.split("## Errors and exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.*) \|$", section, flags=re.MULTILINE)
    return [(int(code), meaning) for code, meaning in rows]


def test_docs_cli_md_shows_the_exit_code_table_row_for_row():
    documented = _documented_table()
    assert len(documented) >= 10, f"read only {documented} from docs/cli.md"
    assert documented == [(int(code), code.meaning) for code in ExitCode]


@pytest.mark.parametrize("error, code", [
    (CheckpointWriteError("disk full"), ExitCode.IO),          # a CheckpointError, but an I/O failure first
    (CheckpointError("truncated"), ExitCode.CHECKPOINT),
    (ConfigError("bad option"), ExitCode.USAGE),
    (XpcnnError("anything else"), ExitCode.ERROR),
])
def test_an_error_ends_with_the_code_of_its_most_specific_type(error, code):
    assert exit_code_for(error) is code
