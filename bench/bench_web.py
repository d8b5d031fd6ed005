"""Web page speed at scale: time to first byte of each registry page on a registry of 100k versions.

The registry is filled as bench_registry_query.py fills it (bulk SQL into the real tables, so the search index is
built by the upgrade that follows the load), then the pages are served by uvicorn on 127.0.0.1 (``hub ui``'s
app) and fetched over HTTP; each figure is the time from sending the request to the response's first byte, p50
and p95 over ``--repeat`` fetches after one warm-up. The goal: under 100 ms per page.

    .venv/bin/python bench/bench_web.py [--size 100000] [--postgres URL] [--repeat 20]
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from bench_registry_query import BASES, populate

from hub.client import Hub, Query
from hub.web import create_app


def first_byte_ms(port: int, path: str) -> tuple[float, int]:
    """Milliseconds from sending GET ``path`` to the first byte of the response, and its status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    start = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()  # returns once the status line (the first bytes) arrived
    elapsed = (time.perf_counter() - start) * 1000
    response.read()
    connection.close()
    return elapsed, response.status


def serve(hub: Hub) -> tuple[uvicorn.Server, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(hub), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, port


def bench(label: str, url: str, size: int, repeat: int) -> None:
    hub = Hub(database_url=url, store=tempfile.mkdtemp(prefix="bench-web-store-"))
    start = time.perf_counter()
    populate(hub.registry, size)
    print(f"{label}: {size:,} versions loaded in {time.perf_counter() - start:.0f} s")
    server, port = serve(hub)
    middle = f"adapter-{size // 20:05d}"
    second_base_page = hub.compatible(BASES[0], Query(limit=50, include_yanked=True)).next_after
    second_search_page = hub.search("lora", Query(limit=50)).next_after
    pages = {
        "home": "/",
        "search, exact name": f"/search?q={middle}",
        "search, common word (lora)": "/search?q=lora",
        "search, word + filters": "/search?q=math&method=lora&where=accuracy%3E%3D0.5",
        "search, page 2": f"/search?q=lora&after={second_search_page}",
        "adapter line": f"/adapters/{middle}",
        "version": f"/adapters/{middle}/3",
        "base (compatible)": f"/bases/{BASES[0].weights_hash}",
        "base, page 2": f"/bases/{BASES[0].weights_hash}?after={second_base_page}",
    }
    print(f"{'page':<30} {'p50 ms':>8} {'p95 ms':>8}")
    for name, path in pages.items():
        first_byte_ms(port, path)
        times = []
        for _ in range(repeat):
            elapsed, status = first_byte_ms(port, path)
            assert status == 200, (path, status)
            times.append(elapsed)
        times.sort()
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        print(f"{name:<30} {statistics.median(times):>8.1f} {p95:>8.1f}")
    server.should_exit = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--postgres", default=None, help="also on this (empty) PostgreSQL database URL")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        bench("SQLite", f"sqlite:///{Path(folder) / 'registry.db'}", args.size, args.repeat)
    if args.postgres:
        bench("PostgreSQL", args.postgres, args.size, args.repeat)


if __name__ == "__main__":
    main()
