"""How fast does Sequencer send, next to plain smtplib, and in how much memory?

An aiosmtpd sink runs in a process of its own on a free loopback port and
counts what it receives. A worker process (``sequencer.worker.run_worker``,
the scheduler and all, with the default four SMTP connections) waits for
work; ``--workers N`` shares the connections among N processes instead.
Then, alternately:

- project: an emailing to the recipients is created through the records API
  with ``send_at`` now; the clock runs from that write until the emailing is
  ``sent`` (scheduler pass, claim, recipients resolved in SQL, per-recipient
  rendering with tracking, SMTP, outcomes committed);
- plain: the same messages, built beforehand, are sent by smtplib over the
  same number of connections to the same sink.

The best rate of each side is kept (the machine may be shared). Every
delivery must be sent once and the sink must have received exactly what was
sent. Then one worker sends to a larger list while its peak resident memory
(``VmHWM``) is read from /proc: recipients are streamed, not loaded.

The last line prints the throughput ratio, project / plain. Target: >= 0.7.

    python bench/send.py [--recipients 10000] [--connections 4] [--workers 1]
                         [--rounds 2] [--memory-recipients 100000]
                         [--url postgresql://...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-send-secret"
SENDER = "news@shop.example.com"
HTML = (
    "<!DOCTYPE html><html><body style='font-family:sans-serif'>"
    "<h1>Nouveautés de la semaine</h1>"
    "<p>Bonjour {contact.name},</p>"
    "<p>Voici nos <a href='https://shop.example.com/nouveautes?utm_source=mail'>"
    "nouveautés</a> et nos <a href='https://shop.example.com/soldes'>soldes</a> "
    "pour votre magasin de {contact.city}.</p>"
    "<p><a href='{unsubscribe_url}'>Se désabonner</a></p></body></html>"
)

TEXT = (
    "Bonjour {contact.name},\n\nVoici nos nouveautés et nos soldes pour votre "
    "magasin de {contact.city} : https://shop.example.com/nouveautes\n\n"
    "Se désabonner : {unsubscribe_url}\n"
)


# --- The sink (a process of its own) ------------------------------------------


def sink(port: int) -> None:
    """Child process: accept every message, count them, report on SIGTERM."""
    from aiosmtpd.controller import Controller

    class Counting:
        received = 0

        async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
            Counting.received += len(envelope.rcpt_tos)
            return "250 2.0.0 accepted"

    controller = Controller(Counting(), hostname="127.0.0.1", port=port)
    controller.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print("ready", flush=True)
    stopped.wait()
    controller.stop()
    print(Counting.received, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- Seeding --------------------------------------------------------------------


def seed_contacts(engine, list_name: str, count: int, start: int = 0) -> int:  # noqa: ANN001
    """Insert ``count`` contacts in a new list, in chunks; return the list id."""
    from sqlalchemy import insert, select

    from sequencer.models import Contact, ContactList, ContactListMember

    now = datetime.now(UTC)
    with engine.begin() as connection:
        list_id = connection.execute(
            insert(ContactList)
            .values(name=list_name, description="", created_at=now, updated_at=now)
            .returning(ContactList.id)
        ).scalar_one()
    for first in range(start, start + count, 5000):
        numbers = range(first, min(first + 5000, start + count))
        rows = [
            {
                "email": f"client{n}@example.com",
                "name": f"Client {n}",
                "attributes": {"city": "Lyon"},
                "tags": [],
                "status": "subscribed",
                "created_at": now,
                "updated_at": now,
            }
            for n in numbers
        ]
        with engine.begin() as connection:
            connection.execute(insert(Contact), rows)
            ids = connection.execute(
                select(Contact.id).where(
                    Contact.email.in_([row["email"] for row in rows])
                )
            ).scalars()
            connection.execute(
                insert(ContactListMember),
                [{"list_id": list_id, "contact_id": cid} for cid in ids],
            )
    return list_id


def create_emailing(engine, sender_id: int, list_id: int, subject: str) -> int:  # noqa: ANN001
    from sqlmodel import Session

    from sequencer import records

    with Session(engine) as session:
        result = records.create_record(
            session,
            "emailing",
            {
                "subject": subject,
                "message": TEXT,
                "html": HTML,
                "sender": sender_id,
                "contact_list": [list_id],
                "send_at": "now",
            },
        )
    return int(result.record["id"])


def wait_sent(engine, emailing_id: int, timeout: float = 1800) -> float:  # noqa: ANN001
    """Wait until the emailing is sent; return when (monotonic seconds).

    One light query every 20 ms: the poll shares the machine with the
    workers it is timing.
    """
    from sqlalchemy import select

    from sequencer.models import Emailing

    query = select(Emailing.status).where(Emailing.id == emailing_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            status = connection.scalar(query)
        if str(status) not in ("pending", "sending"):
            return time.monotonic()
        time.sleep(0.02)
    raise SystemExit(f"emailing {emailing_id} was not sent in {timeout}s")


def check_sent(engine, emailing_id: int, expected: int) -> None:  # noqa: ANN001
    from sqlalchemy import func, select
    from sqlmodel import Session

    from sequencer.models import Delivery, Emailing

    with Session(engine) as session:
        emailing = session.get_one(Emailing, emailing_id)
        rows = session.scalar(
            select(func.count()).where(
                Delivery.emailing_id == emailing_id, Delivery.status == "sent"
            )
        )
    if not (emailing.status.value == "sent" == "sent" and emailing.sent == expected):
        raise SystemExit(
            f"emailing {emailing_id}: status {emailing.status.value}, "
            f"sent {emailing.sent} of {expected}: {emailing.note}"
        )
    if rows != expected:
        raise SystemExit(f"emailing {emailing_id}: {rows} sent rows, not {expected}")


# --- Plain smtplib ------------------------------------------------------------------


def build_messages(engine, emailing_id: int) -> list[tuple[str, bytes]]:  # noqa: ANN001
    """The messages of a sent emailing, built again as the worker built them."""
    from sqlalchemy import select
    from sqlmodel import Session

    from sequencer.message import Draft, LinkIds, Recipient
    from sequencer.models import Contact, Delivery, Emailing

    with Session(engine) as session:
        emailing = session.get_one(Emailing, emailing_id)
        rows = session.execute(
            select(Delivery.id, Delivery.email, Contact.name, Contact.attributes)
            .join(Contact, Contact.id == Delivery.contact_id)
            .where(Delivery.emailing_id == emailing_id)
            .order_by(Delivery.id)
        ).all()
    draft = Draft.from_emailing(emailing)
    link_ids = LinkIds(engine, emailing_id)
    now = datetime.now(UTC)
    return [
        (
            row.email,
            draft.compose(
                Recipient(row.email, row.name, row.attributes, row.id),
                link_ids=link_ids,
                now=now,
            ).as_bytes(),
        )
        for row in rows
    ]


def send_plain(port: int, messages: list[tuple[str, bytes]], connections: int) -> float:
    """Send pre-built messages over ``connections`` smtplib sessions; seconds."""

    def send(part: list[tuple[str, bytes]]) -> None:
        with smtplib.SMTP("127.0.0.1", port) as client:
            for address, data in part:
                client.sendmail(SENDER, [address], data)

    parts = [messages[n::connections] for n in range(connections)]
    threads = [threading.Thread(target=send, args=(part,)) for part in parts]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - start


# --- Workers ------------------------------------------------------------------------


def start_worker(name: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    code = (
        "import sys; from sequencer.worker import run_worker; "
        "sys.exit(run_worker(host='127.0.0.1'))"
    )
    worker_env = {
        **env,
        "SEQUENCER_WORKER_ID": name,
        "SEQUENCER_TRACKING_PORT": str(free_port()),
    }
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=worker_env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def wait_workers(engine, names: list[str]) -> None:  # noqa: ANN001
    from sqlalchemy import select
    from sqlmodel import Session

    from sequencer.models import WorkerHeartbeat

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with Session(engine) as session:
            seen = set(session.scalars(select(WorkerHeartbeat.worker_id)))
        if set(names) <= seen:
            return
        time.sleep(0.1)
    raise SystemExit(f"workers {names} did not start")


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        if worker.wait(120) != 0:
            raise SystemExit(f"worker {worker.pid} exited with {worker.returncode}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of a process so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc: peak memory cannot be read here")


# --- Main --------------------------------------------------------------------------


def run(
    args: argparse.Namespace,
    engine,  # noqa: ANN001
    env: dict[str, str],
    folder: Path,
    port: int,
    sender_id: int,
    list_id: int,
    children: list[subprocess.Popen],
) -> tuple[float, float]:
    """Both sides, alternately, then the memory run; returns the best rates."""
    sink_process = subprocess.Popen(
        [sys.executable, __file__, "--sink", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    children.append(sink_process)
    assert sink_process.stdout is not None
    if sink_process.stdout.readline().strip() != "ready":
        raise SystemExit(
            "the SMTP sink did not start (aiosmtpd is a development requirement: "
            ".venv/bin/pip install -r requirements-dev.txt)"
        )
    expected_at_sink = 0

    # Workers wait for work; the scheduler starts them polling.
    names = [f"bench-{n}" for n in range(args.workers)]
    workers = [start_worker(name, env, folder / f"{name}.log") for name in names]
    children.extend(workers)
    wait_workers(engine, names)

    project_rates: list[float] = []
    plain_rates: list[float] = []
    for round_number in range(1, args.rounds + 1):
        cpu_before = sum(cpu_seconds(worker.pid) for worker in workers)
        start = time.monotonic()
        emailing_id = create_emailing(
            engine, sender_id, list_id, "Bench {contact.name}"
        )
        seconds = wait_sent(engine, emailing_id) - start
        cpu = sum(cpu_seconds(worker.pid) for worker in workers) - cpu_before
        check_sent(engine, emailing_id, args.recipients)
        expected_at_sink += args.recipients
        project_rates.append(args.recipients / seconds)
        print(
            f"round {round_number} project: {args.recipients} messages in "
            f"{seconds:.2f}s ({project_rates[-1]:.0f}/s), worker CPU "
            f"{cpu / args.recipients * 1000:.2f} ms per message"
        )

        messages = build_messages(engine, emailing_id)
        seconds = send_plain(port, messages, args.connections)
        expected_at_sink += len(messages)
        plain_rates.append(len(messages) / seconds)
        print(
            f"round {round_number} plain smtplib: {len(messages)} messages in "
            f"{seconds:.2f}s ({plain_rates[-1]:.0f}/s)"
        )
    stop_workers(workers)

    # Peak memory of one worker sending to a large list.
    if args.memory_recipients:
        big_list = seed_contacts(
            engine, "Bench memory", args.memory_recipients, start=args.recipients
        )
        worker = start_worker("bench-memory", env, folder / "memory.log")
        children.append(worker)
        wait_workers(engine, ["bench-memory"])
        idle = peak_rss_mb(worker.pid)
        emailing_id = create_emailing(engine, sender_id, big_list, "Big {contact.name}")
        start = time.monotonic()
        wait_sent(engine, emailing_id)
        seconds = time.monotonic() - start
        peak = peak_rss_mb(worker.pid)
        check_sent(engine, emailing_id, args.memory_recipients)
        expected_at_sink += args.memory_recipients
        stop_workers([worker])
        verdict = "ok" if peak < 300 else "OVER"
        print(
            f"memory: one worker sent {args.memory_recipients} messages in "
            f"{seconds:.0f}s; peak RSS {peak:.0f} MB (idle {idle:.0f} MB), "
            f"target < 300 MB: {verdict}"
        )

    sink_process.send_signal(signal.SIGTERM)
    received = int(sink_process.stdout.readline())
    sink_process.wait(30)
    if received != expected_at_sink:
        raise SystemExit(f"the sink received {received}, expected {expected_at_sink}")
    print(f"sink received {received} messages, as many as were sent")
    return max(project_rates), max(plain_rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-recipients", type=int, default=100_000)
    parser.add_argument("--url", help="database URL (default: SQLite in a temp dir)")
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        sink(args.sink)
        return
    if args.connections % args.workers:
        parser.error("--connections must be a multiple of --workers")

    folder = Path(tempfile.mkdtemp(prefix="bench-send-"))
    url = args.url or f"sqlite:///{folder / 'bench.db'}"
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SEQUENCER_DATABASE_URL": url,
        "SEQUENCER_SMTP_URL": f"smtp://127.0.0.1:{port}",
        "SEQUENCER_SMTP_CONNECTIONS": str(args.connections // args.workers),
        "SEQUENCER_SECRET_KEY": SECRET,
        "SEQUENCER_TICK_SECONDS": "0.1",
        "SEQUENCER_PUBLIC_URL": "https://mail.shop.example.com",
    }
    os.environ.update(env)

    from sequencer import db
    from sequencer.models import Sender
    from sequencer.system import ensure_system_entities

    engine = db.get_engine()
    db.create_schema(engine)
    with db.session_scope(engine) as session:
        ensure_system_entities(session)
        sender = Sender(name="Boutique Été", email=SENDER)
        session.add(sender)
        session.flush()
        sender_id = int(sender.id)
    list_id = seed_contacts(engine, "Bench", args.recipients)
    print(f"database {url.split('://')[0]}, {args.recipients} recipients")

    children: list[subprocess.Popen] = []
    try:
        rates = run(args, engine, env, folder, port, sender_id, list_id, children)
    except BaseException:
        print(f"worker logs and database kept in {folder}", file=sys.stderr)
        raise
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    engine.dispose()
    if not args.url:
        shutil.rmtree(folder, ignore_errors=True)
    project, plain = rates
    print(
        f"best rates: project {project:.0f}/s, plain {plain:.0f}/s over "
        f"{args.connections} connections ({args.workers} worker processes)"
    )
    print(f"ratio {project / plain:.2f} (project / plain, target >= 0.7)")


if __name__ == "__main__":
    main()
