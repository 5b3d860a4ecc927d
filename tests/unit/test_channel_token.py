"""Where clients find their bearer token: DELTAVAULT_TOKEN, else the file
DELTAVAULT_TOKEN_FILE names (a mounted Secret), else none."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.channel import TOKEN_ENV, TOKEN_FILE_ENV, bearer_token


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    assert bearer_token() is None
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(secret))
    assert bearer_token() == "from-file"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert bearer_token() == "from-env"
    monkeypatch.delenv(TOKEN_ENV)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="cannot read"):
        bearer_token()
