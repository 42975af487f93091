"""``python -m sequencer``: set up, load and move data from the command line.

Each subcommand prints what it did and exits non-zero with a one-line reason
when it cannot; ``--help`` on each explains its arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sequencer.exceptions import SequencerError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def _init(args: argparse.Namespace) -> int:
    from sequencer.db import get_engine, init_db

    init_db()
    _say(f"database ready: {get_engine().url.render_as_string(hide_password=True)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sequencer.db import init_db, session_scope
    from sequencer.demo import load_demo

    init_db()
    with session_scope() as session:
        report = load_demo(session)
    _say(str(report))
    return 0


def _export_config(args: argparse.Namespace) -> int:
    from sequencer.config_io import write_config
    from sequencer.db import session_scope

    with session_scope() as session:
        text = write_config(session, args.output)
    if args.output:
        _say(f"configuration written to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _import_config(args: argparse.Namespace) -> int:
    from sequencer.config_io import import_config
    from sequencer.db import init_db, session_scope

    init_db()
    with session_scope() as session:
        report = import_config(session, Path(args.file))
    _say(report.summary())
    for warning in report.warnings:
        _say(f"warning: {warning}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from sequencer.csv_import import import_csv
    from sequencer.db import init_db, session_scope

    init_db()
    path = Path(args.file)
    if not path.is_file():
        raise SequencerError(f"no such file: {path}")

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{done}/{total} rows")
            if done == total:
                sys.stderr.write("\n")

    with session_scope() as session:
        report = import_csv(session, args.entity, path, key=args.key, progress=progress)
    _say(f"read {path} as {report.encoding}, separator {report.delimiter!r}")
    for warning in report.warnings:
        _say(f"warning: {warning}")
    for row, reason in report.rejected:
        _say(f"rejected row {row}: {reason}")
    _say(report.summary())
    # The other rows are stored; a script must still learn that some were not.
    return 1 if report.rejected else 0


def _worker(args: argparse.Namespace) -> int:
    from sequencer.db import init_db
    from sequencer.worker import run_worker

    init_db()
    return int(run_worker(host=args.host, port=args.port) or 0)


def _run(args: argparse.Namespace) -> int:
    from sequencer.db import init_db
    from sequencer.server import run_server

    init_db()
    run_server(host=args.host, port=args.port)
    return 0


_SERVERS = (_worker, _run)
"""Commands that keep running: they log at INFO level."""


def _send_test(args: argparse.Namespace) -> int:
    from sequencer.db import session_scope
    from sequencer.delivery import send_test

    with session_scope() as session:
        _say(send_test(session, args.emailing_id, args.address))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line, one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m sequencer",
        description="Sequencer: sequences that act when business records change, "
        "and the emailings they send.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every step (debug level)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[..., int], text: str) -> Any:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    command("init", _init, "Create the database, or migrate it to the newest schema.")
    command(
        "demo",
        _demo,
        "Load the demo data set from data/demo (entities, contacts, senders, "
        "sequences and past emailings with their statistics). Does nothing if "
        "the demo is already loaded.",
    )
    export = command(
        "export-config",
        _export_config,
        "Write entities, properties, entity groups, senders, contact lists and "
        "sequences as one JSON document.",
    )
    export.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of stdout"
    )
    load = command(
        "import-config",
        _import_config,
        "Create or update what a JSON configuration document describes; all or "
        "nothing, and importing the same file twice changes nothing.",
    )
    load.add_argument("file", metavar="FILE", help="a document from export-config")
    records = command(
        "import",
        _import,
        "Create or update records of an entity (contacts too) from a CSV file; "
        "each row fires sequences. UTF-8 or Latin-1, comma or semicolon.",
    )
    records.add_argument("entity", metavar="ENTITY", help="entity name, e.g. produits")
    records.add_argument("file", metavar="FILE", help="the CSV file, with a header row")
    records.add_argument(
        "--key",
        metavar="COLUMN",
        help="column that finds the record a row updates (default: email for "
        "contacts, id when present; otherwise every row creates a record)",
    )
    worker = command(
        "worker",
        _worker,
        "Run the scheduler headless, with the tracking routes on their own port.",
    )
    worker.add_argument("--host", default="0.0.0.0", help="tracking address to bind")
    worker.add_argument(
        "--port",
        type=int,
        default=None,
        help="tracking port (default: SEQUENCER_TRACKING_PORT)",
    )
    run = command(
        "run", _run, "Start the dashboard with its scheduler and tracking routes."
    )
    run.add_argument("--host", default="127.0.0.1", help="address to bind")
    run.add_argument("--port", type=int, default=8501, help="port to serve on")
    test = command(
        "send-test",
        _send_test,
        "Send one test message of an emailing to an address (never counted).",
    )
    test.add_argument("emailing_id", type=int, metavar="EMAILING_ID")
    test.add_argument("address", metavar="ADDRESS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        # The servers log what they send and claim; one-off commands print
        # their result and log only what went wrong.
        quiet = logging.INFO if args.handler in _SERVERS else logging.WARNING
        level = logging.DEBUG if args.verbose else quiet
        logging.basicConfig(level=level, format=LOG_FORMAT)
        logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
    try:
        return int(args.handler(args))
    except SequencerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
