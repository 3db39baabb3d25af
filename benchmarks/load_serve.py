"""Load test of `kmnist serve`: N POST /predict requests from C concurrent clients, latency percentiles.

Starts its own server on 127.0.0.1 (a free port) and talks to nothing else; bounded in requests and
in time. Client and server share the machine, so the figures include the client's CPU use.

    python benchmarks/load_serve.py runs/.../best.pt --data-dir ../shared/data --out docs/serving-load.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from kmnist.runinfo import cpu_model

MAX_REQUESTS = 100_000  # hard bound, whatever is asked
WARMUP_REQUESTS = 50  # per run, not counted: first requests pay for lazy initialisation


def test_images(data_dir: str | None, count: int) -> tuple[list[bytes], str]:
    """PNG files of the first `count` test images, or of synthetic strokes when no data is found."""
    if data_dir:
        from kmnist.data import load_dataset

        test = load_dataset("kmnist", data_dir, download=False, progress=False, test_only=True).test
        images = test.images[:count].numpy()
        source = f"the first {count} KMNIST test images as 28x28 PNG"
    else:
        rng = np.random.default_rng(0)
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        for image in images:
            row, column = rng.integers(4, 20, 2)
            image[row:row + 6, 2:26] = 255
            image[2:26, column:column + 5] = 200
        source = f"{count} synthetic 28x28 PNG images"
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return encoded, source


def start_server(checkpoint: str, threads: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "kmnist", "serve", checkpoint, "--host", "127.0.0.1", "--port", "0",
               "--threads", str(threads)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if not line.startswith("kmnist serve: http://127.0.0.1:"):
        server.kill()
        raise SystemExit(f"server did not start: {line!r}")
    url = line.split()[2]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("server did not answer /health within 60 s")


def run_load(url: str, uploads: list[bytes], requests: int, clients: int, time_limit: float) -> dict:
    """Each client thread keeps one connection and takes the next request number until all are sent."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while time.monotonic() < deadline:
                with lock:
                    number = next(counter, None)
                if number is None:
                    return
                started = time.perf_counter()
                try:
                    response = http.post("/predict", content=uploads[number % len(uploads)],
                                         headers={"content-type": "image/png"})
                    ok = response.status_code == 200 and len(response.json()["top"]) == 5
                    problem = None if ok else f"status {response.status_code}"
                except (httpx.HTTPError, ValueError, KeyError) as error:
                    problem = f"{type(error).__name__}: {error}"
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        failures.append(problem)

    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    milliseconds = np.array(latencies) * 1000
    return {
        "requests_sent": len(latencies),
        "requests_asked": requests,
        "errors": len(failures),
        "first_errors": failures[:5],
        "stopped_by_time_limit": len(latencies) < requests,
        "wall_seconds": round(wall, 2),
        "requests_per_second": round(len(latencies) / wall, 1),
        "latency_ms": {name: round(float(np.percentile(milliseconds, q)), 2)
                       for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
        | {"mean": round(float(milliseconds.mean()), 2)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", help="KMNIST folder for real test images (else synthetic images)")
    parser.add_argument("--requests", type=int, default=2000, help="(default: 2000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds before stopping early (default: 300)")
    parser.add_argument("--threads", type=int, default=1, help="server's --threads (default: 1)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    requests = min(max(args.requests, 1), MAX_REQUESTS)
    clients = min(max(args.clients, 1), 64)

    uploads, source = test_images(args.data_dir, 200)
    server, url = start_server(args.checkpoint, args.threads)
    try:
        run_load(url, uploads, min(WARMUP_REQUESTS, requests), clients, 60)
        result = run_load(url, uploads, requests, clients, min(args.time_limit, 3600))
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {
        **result,
        "clients": clients,
        "images": source,
        "warmup_requests": WARMUP_REQUESTS,
        "server": f"kmnist serve --threads {args.threads} (uvicorn, one process), on 127.0.0.1",
        "checkpoint": args.checkpoint,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    latency = result["latency_ms"]
    print(f"{result['requests_sent']} requests from {clients} clients in {result['wall_seconds']} s "
          f"({result['requests_per_second']} /s), {result['errors']} errors")
    print(f"latency ms: p50 {latency['p50']}  p90 {latency['p90']}  p99 {latency['p99']}  max {latency['max']}")
    print(f"on {result['cpu']}, {result['cpu_cores']} cores (client and server together)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if result["errors"] == 0 and not result["stopped_by_time_limit"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
