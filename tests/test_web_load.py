"""A real uvicorn server on loopback: concurrent clients get correct answers with zero errors in bounded time,
and the process's memory stays flat over 1000 predictions."""

from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from web_helpers import RUN, digit_png, loopback_server, train_tiny_run
from xailab.web import create_app

CLIENTS = 8
REQUESTS_PER_CLIENT = 25


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    app = create_app(train_tiny_run(tmp_path_factory))
    with loopback_server(app) as url:
        yield url


def same_top(a: list[dict], b: list[dict]) -> bool:
    """Same classes in the same order with the same probabilities (to float32 rounding across batch sizes)."""
    return [c["name"] for c in a] == [c["name"] for c in b] and all(
        abs(x["probability"] - y["probability"]) < 1e-5 for x, y in zip(a, b, strict=True)
    )


def test_concurrent_clients_get_consistent_answers_without_errors(base_url):
    digits = [digit_png(i)[0] for i in range(4)]
    with httpx.Client(base_url=base_url, timeout=60) as c:
        expected = [
            c.post(f"/api/runs/{RUN}/predict", files={"file": ("d.png", d)}, data={"top_k": "3"}).json()[
                "top"
            ]
            for d in digits
        ]

    def client(worker: int) -> list[tuple[int, int, bool]]:
        outcomes = []
        with httpx.Client(base_url=base_url, timeout=60) as c:
            for i in range(REQUESTS_PER_CLIENT):
                k = (worker + i) % len(digits)
                if i % 5 == 4:  # every fifth request an explanation, the others predictions
                    r = c.post(
                        f"/api/runs/{RUN}/explain",
                        files={"file": ("d.png", digits[k])},
                        data={"methods": "gradcam"},
                    )
                else:
                    r = c.post(f"/api/runs/{RUN}/predict", files={"file": ("d.png", digits[k])})
                same = r.status_code == 200 and same_top(r.json()["top"], expected[k])
                outcomes.append((k, r.status_code, same))
        return outcomes

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = [o for result in pool.map(client, range(CLIENTS)) for o in result]
    elapsed = time.perf_counter() - start
    assert len(outcomes) == CLIENTS * REQUESTS_PER_CLIENT
    assert [o for o in outcomes if o[1] != 200] == []
    # answers computed in shared batches equal the answers computed alone
    assert all(same for _, _, same in outcomes)
    assert elapsed < 120, f"{len(outcomes)} requests took {elapsed:.0f} s"


def test_memory_is_flat_over_1000_predictions(base_url):
    process = psutil.Process()
    digit = digit_png(1)[0]
    with httpx.Client(base_url=base_url, timeout=60) as c:

        def predict(n: int) -> None:
            for _ in range(n):
                r = c.post(f"/api/runs/{RUN}/predict", files={"file": ("d.png", digit)})
                assert r.status_code == 200

        predict(100)  # warm-up: allocator pools, caches, lazily built objects
        gc.collect()
        before = process.memory_info().rss
        predict(1000)
        gc.collect()
        grown = process.memory_info().rss - before
    # A leak of even 20 kB per request (one copy of a small image and its tensors) would show as 20 MB.
    assert grown < 15 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB over 1000 requests"
