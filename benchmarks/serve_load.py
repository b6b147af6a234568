"""Load test of the web API on loopback: N concurrent clients x M requests each, predict then explain.

Starts ``xailab.web.create_app`` under uvicorn in a child process (one worker, as ``xailab serve`` does), takes
the run's own test-set samples from ``/api/runs/<run>/samples`` as inputs, and prints per phase: requests,
errors, latency percentiles p50/p90/p99 (client side, upload to parsed answer) and throughput.

    python benchmarks/serve_load.py --runs runs/results --run mnist_cnn__mnist --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch


@contextlib.contextmanager
def server_process(runs: str, data_dir: str | None, max_batch: int) -> Iterator[str]:
    """``create_app`` under uvicorn (one worker, as ``xailab serve`` runs it) in a separate process, so that
    the clients' Python work does not share the server's interpreter lock; yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys, uvicorn; from xailab.web import create_app; "
        "uvicorn.run(create_app(sys.argv[1], data_dir=sys.argv[2] or None, max_batch=int(sys.argv[3])), "
        "host='127.0.0.1', port=int(sys.argv[4]), log_level='warning')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, runs, data_dir or "", str(max_batch), str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/api/runs", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("serve_load: the server did not start")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_phase(base_url: str, path: str, images: list[bytes], form: dict, clients: int, requests: int) -> dict:
    """``clients`` threads, each with its own keep-alive connection, send ``requests`` uploads to ``path``."""

    def client(worker: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with httpx.Client(base_url=base_url, timeout=120) as c:
            for i in range(requests):
                data = images[(worker * requests + i) % len(images)]
                start = time.perf_counter()
                r = c.post(path, files={"file": ("x.png", data)}, data=form)
                r.json()
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200
        return latencies, errors

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies = np.array([x for lat, _ in results for x in lat]) * 1000
    return {
        "requests": latencies.size,
        "errors": sum(e for _, e in results),
        "p50": np.percentile(latencies, 50),
        "p90": np.percentile(latencies, 90),
        "p99": np.percentile(latencies, 99),
        "throughput": latencies.size / wall,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default="runs/results", help="runs folder served")
    parser.add_argument("--run", default="mnist_cnn__mnist", help="the run under load")
    parser.add_argument("--data-dir", help="datasets folder for the run's test-set samples")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per client and phase")
    parser.add_argument("--methods", default="gradcam", help="methods of the explain phase")
    parser.add_argument("--phases", default="predict,explain")
    parser.add_argument("--max-batch", type=int, default=64, help="1: no batching of concurrent predictions")
    args = parser.parse_args()

    with (
        server_process(args.runs, args.data_dir, args.max_batch) as base_url,
        httpx.Client(base_url=base_url, timeout=120) as c,
    ):
        samples = c.get(f"/api/runs/{args.run}/samples")
        if samples.status_code != 200:
            sys.exit(f"serve_load: {samples.json()['detail']}")
        images = [c.get(s["url"]).content for s in samples.json()]
        info = c.get(f"/api/runs/{args.run}").json()
        print(
            f"# {args.run} ({info['model']}, {info['image_size'][0]}x{info['image_size'][1]}x{info['channels']}) "
            f"on {info['device']}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
            f"load average {os.getloadavg()[0]:.1f} at start"
        )
        print(
            f"# {args.clients} clients x {args.requests} requests per phase, {len(images)} distinct test images, "
            f"max batch {args.max_batch}"
        )
        print("| phase | requests | errors | p50 ms | p90 ms | p99 ms | requests/s |")
        print("|---|---|---|---|---|---|---|")
        forms = {"predict": {"top_k": "3"}, "explain": {"methods": args.methods}}
        for phase in args.phases.split(","):
            path = f"/api/runs/{args.run}/{phase}"
            run_phase(base_url, path, images, forms[phase], args.clients, 5)  # warm-up
            r = run_phase(base_url, path, images, forms[phase], args.clients, args.requests)
            label = phase if phase == "predict" else f"explain ({args.methods})"
            print(
                f"| {label} | {r['requests']} | {r['errors']} | {r['p50']:.1f} | {r['p90']:.1f} | "
                f"{r['p99']:.1f} | {r['throughput']:.1f} |",
                flush=True,
            )
        print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
