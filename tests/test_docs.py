"""Docs match the code: the README's tables of settings and error codes say what the code does."""
from __future__ import annotations

import re
from pathlib import Path

from worker.decision import DEFAULT_ERROR_ACTIONS
from worker.errors import ErrorCode
from worker.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_documents_every_setting():
    """Each DEEPFAKE_* setting is in the README's table, and the table names no other."""
    documented = set(re.findall(r"^\| `DEEPFAKE_([A-Z0-9_]+)` \|", README, re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from the README table"
    assert documented - fields == set(), "README table rows with no setting"


def test_readme_error_codes_are_the_closed_set_with_their_default_actions():
    table = README[README.index("### Error codes"):]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| .* \| `?(allow|review|block|null)`? \|$", table, re.M))
    assert set(rows) == {code.value for code in ErrorCode}
    assert {code: None if action == "null" else action for code, action in rows.items()} == DEFAULT_ERROR_ACTIONS
