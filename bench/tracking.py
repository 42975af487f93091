"""How much does tracking cost the open pixel?

Serves the open pixel two ways, each by uvicorn in a process of its own on a
free loopback port: the real tracking app (token check, event queued, written
in batches by the background writer), and a bare Starlette handler returning
the same image with the same headers and no bookkeeping. A load generator in
this process (asyncio, keep-alive connections, bounded concurrency) sends the
same number of requests to each, one token per recipient in turn, in rounds
that alternate between the two servers (each keeps its best round, so the
machine's other work weighs on both alike). The real
server is then stopped gracefully, and the events stored must equal the
requests it answered: nothing lost. The last line prints the ratio of the two
request rates, tracking / bare. Target: at least 0.5, with nothing lost.

    python bench/tracking.py [--requests 20000] [--concurrency 16]
                             [--recipients 2000] [--url postgresql://...]

With ``--url``, the tables of that database are dropped and rebuilt: point it
at a database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-tracking-secret"


def serve(kind: str, port: int) -> None:
    """Child process: serve the tracking app or the bare handler on ``port``."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from sequencer import tracking

    if kind == "tracking":
        app = tracking.tracking_app()
    else:

        async def bare_pixel(request):
            return Response(
                tracking.PIXEL, media_type="image/gif", headers=tracking.NO_CACHE
            )

        app = Starlette(routes=[Route("/t/o/{token}", bare_pixel, methods=["GET"])])
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # the parent's SIGINT, after uvicorn's graceful shutdown


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(kind: str, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port)], env=env
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the {kind} server did not start")


async def _worker(port: int, paths: list[str], cursor: list[int], answered: list[int]):
    """One keep-alive connection sending GETs one after another."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while cursor[0] < len(paths):
            path = paths[cursor[0]]
            cursor[0] += 1
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: bench\r\n"
                "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Bench/1.0\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200"):
                answered[0] += 1
    finally:
        writer.close()


async def load(port: int, paths: list[str], concurrency: int) -> tuple[float, int]:
    """Send every path once over ``concurrency`` connections; (seconds, 200s)."""
    cursor = [0]
    answered = [0]
    started = time.perf_counter()
    await asyncio.gather(
        *(_worker(port, paths, cursor, answered) for _ in range(concurrency))
    )
    return time.perf_counter() - started, answered[0]


def prepare(url: str, recipients: int) -> list[str]:
    """An emailing sent to ``recipients`` contacts; the path of each open pixel."""
    from sqlalchemy import insert, select

    from sequencer import db, tokens
    from sequencer.enums import DeliveryStatus, EmailingStatus
    from sequencer.models import Contact, Delivery, Emailing, Sender
    from sequencer.timeutil import utcnow

    engine = db.make_engine(url)
    db.create_schema(engine)
    now = utcnow()
    with engine.begin() as connection:
        sender_id = connection.execute(
            insert(Sender).values(name="Shop", email="shop@example.com")
        ).inserted_primary_key[0]
        emailing_id = connection.execute(
            insert(Emailing).values(
                subject="Bench",
                sender_id=sender_id,
                status=EmailingStatus.SENT,
                total=recipients,
                sent=recipients,
                send_at=now,
                started_at=now,
                contact_lists=[],
                tag_filter=[],
            )
        ).inserted_primary_key[0]
        connection.execute(
            insert(Contact),
            [
                {"email": f"reader{n}@example.com", "attributes": {}, "tags": []}
                for n in range(recipients)
            ],
        )
        contact_ids = connection.execute(select(Contact.id)).scalars().all()
        connection.execute(
            insert(Delivery),
            [
                {
                    "emailing_id": emailing_id,
                    "contact_id": contact_id,
                    "email": f"reader{n}@example.com",
                    "status": DeliveryStatus.SENT,
                    "sent_at": now,
                }
                for n, contact_id in enumerate(contact_ids)
            ],
        )
        delivery_ids = connection.execute(select(Delivery.id)).scalars().all()
    engine.dispose()
    return [
        tokens.open_url(delivery_id).split("/", 3)[3] for delivery_id in delivery_ids
    ]


def count_events(url: str) -> int:
    from sqlalchemy import func, select

    from sequencer import db
    from sequencer.models import TrackingEvent

    engine = db.make_engine(url)
    with engine.connect() as connection:
        stored = connection.execute(select(func.count(TrackingEvent.id))).scalar_one()
    engine.dispose()
    return stored


def reset_postgres(url: str) -> None:
    from sqlmodel import SQLModel

    from sequencer import db

    engine = db.make_engine(url)
    SQLModel.metadata.drop_all(engine)
    engine.dispose()


def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    url = args.url or f"sqlite:///{workdir / 'bench.db'}"
    if args.url:
        reset_postgres(url)
    env = dict(os.environ, SEQUENCER_DATABASE_URL=url, SEQUENCER_SECRET_KEY=SECRET)
    env["SEQUENCER_PUBLIC_URL"] = "http://127.0.0.1"
    env["PYTHONPATH"] = str(ROOT)
    os.environ.update(env)

    pixels = prepare(url, args.recipients)
    paths = ["/" + pixels[n % len(pixels)] for n in range(args.requests)]
    warmup = paths[: args.warmup]
    print(f"database: {url.split('://')[0]}, {args.recipients} recipients")
    print(f"{args.requests} requests per server, {args.concurrency} connections")

    # Both servers run side by side and take turns, round after round, so a
    # change in the machine's load hits both alike; each keeps its best round.
    servers = {kind: start_server(kind, env) for kind in ("bare", "tracking")}
    best = dict.fromkeys(servers, 0.0)
    served = dict.fromkeys(servers, 0)
    chunk = max(1, len(paths) // args.rounds)
    try:
        for kind, (_process, port) in servers.items():
            _seconds, answered = asyncio.run(load(port, warmup, args.concurrency))
            served[kind] += answered
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            for kind, (_process, port) in servers.items():
                seconds, answered = asyncio.run(load(port, part, args.concurrency))
                if answered != len(part):
                    raise SystemExit(f"{kind}: {answered} of {len(part)} answered 200")
                served[kind] += answered
                best[kind] = max(best[kind], len(part) / seconds)
    finally:
        for process, _port in servers.values():
            # SIGINT: uvicorn's graceful stop, which runs the lifespan exit.
            process.send_signal(signal.SIGINT)
        for process, _port in servers.values():
            process.wait(timeout=120)
    for kind, rate in best.items():
        print(f"{kind:>8}: {rate:8.0f} requests/s (best of {args.rounds} rounds)")
    rates = best
    answered_by_tracking = served["tracking"]

    stored = count_events(url)
    lost = answered_by_tracking - stored
    print(
        f"events stored {stored} of {answered_by_tracking} pixels served: lost {lost}"
    )
    ratio = rates["tracking"] / rates["bare"]
    verdict = "ok" if ratio >= 0.5 and lost == 0 else "MISSED"
    print(f"ratio {ratio:.2f} (target >= 0.5, nothing lost: {lost == 0}) {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recipients", type=int, default=2000)
    parser.add_argument("--url", help="database URL (default: a new SQLite file)")
    parser.add_argument("--serve", choices=["tracking", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
    else:
        run(args)


if __name__ == "__main__":
    main()
