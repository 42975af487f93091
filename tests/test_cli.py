"""The command line: each subcommand's help, and the data commands end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from sequencer import config, db
from sequencer.cli import main
from sequencer.config import DATA_DIR, ROOT
from sequencer.models import Sequence

SUBCOMMANDS = [
    "init", "demo", "export-config", "import-config", "import", "worker", "run",
    "send-test",
]  # fmt: skip


@pytest.fixture
def fresh_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty SQLite file that the CLI creates with the migrations."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("SEQUENCER_DATABASE_URL", url)
    config.get_settings.cache_clear()
    db.reset_engine()
    yield url
    db.reset_engine()
    config.get_settings.cache_clear()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sequencer", command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert f"usage: python -m sequencer {command}" in result.stdout


def test_import_config_then_export_round_trips(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "exported.json"

    assert main(["import-config", str(DATA_DIR / "config.example.json")]) == 0
    assert "created 3 entities" in capsys.readouterr().out
    assert main(["export-config", "-o", str(output)]) == 0

    exported = json.loads(output.read_text(encoding="utf-8"))
    names = [s["name"] for s in exported["sequences"]]
    assert "Stock bas" in names and len(names) == 4
    with Session(db.get_engine()) as session:
        assert len(session.exec(select(Sequence)).all()) == 4


def test_import_prints_rejected_rows_and_summary(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["import-config", str(DATA_DIR / "config.example.json")])
    csv_file = tmp_path / "produits.csv"
    csv_file.write_text("sku;nom;quantite\nA1;Café;12\nB2;;3\n", encoding="utf-8")
    capsys.readouterr()

    assert main(["import", "produits", str(csv_file), "--key", "sku"]) == 1

    out = capsys.readouterr().out
    assert "rejected row 3: produits: nom: required" in out
    assert "created 1, updated 0, unchanged 0, rejected 1, sequences run 0" in out


def test_errors_exit_non_zero_with_one_line(
    fresh_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["import", "nulle_part", str(tmp_path / "absent.csv")]) == 1
    assert capsys.readouterr().err.startswith("error: no such file")


def test_demo_creates_the_database_and_loads_once(
    fresh_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo"]) == 0
    first = capsys.readouterr().out

    assert main(["demo"]) == 0

    assert "contacts: created 200" in first
    assert "the demo was not loaded on top of it" in capsys.readouterr().out
