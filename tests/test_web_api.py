"""The web API through FastAPI's test client: runs, predictions and explanations agree with the Python API;
reports are served safely; every bad input is a 4xx with a clear JSON message."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import xailab
import xailab.errors
from web_helpers import RUN, digit_png, png_bytes, train_tiny_run
from xailab import api
from xailab.cli import main
from xailab.explain import applicable_methods
from xailab.web import create_app
from xailab.web.limits import FORM_OVERHEAD_BYTES
from xailab.web.serving import SAMPLES_PER_RUN, PredictBatcher

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # what create_app(device="auto") picks


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def client(runs_dir):
    return TestClient(create_app(runs_dir))


@pytest.fixture(scope="module")
def run(runs_dir):
    """The run as the app loads it (same device), for parity checks."""
    return xailab.load_run(runs_dir / RUN, device=DEVICE)


def decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])), formats=["PNG"]) as im:
        return np.asarray(im.convert("RGB"))


def post_image(client, path: str, data: bytes, name: str = "digit.png", **form):
    return client.post(path, files={"file": (name, data, "application/octet-stream")}, data=form)


def assert_error(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for fragment in fragments:
        assert fragment in detail, detail
    return detail


# ------------------------------------------------------------------------------------------------ runs
def test_list_runs_and_run_info(client, run):
    rows = client.get("/api/runs").json()
    assert [r["run"] for r in rows] == [RUN]
    assert rows[0]["model"] == "mnist_cnn" and rows[0]["dataset"] == "digits"
    assert rows[0]["test_accuracy"] == pytest.approx(run.metrics["test"]["accuracy"])
    info = client.get(f"/api/runs/{RUN}").json()
    assert info["class_names"] == [str(d) for d in range(10)]
    assert info["image_size"] == [28, 28] and info["channels"] == 1
    assert info["device"].split(":")[0] == DEVICE
    assert info["test_macro_f1"] == pytest.approx(run.metrics["test"]["macro_f1"])


def test_methods_are_the_registry(client):
    assert [m["name"] for m in client.get("/api/methods").json()] == xailab.list_methods()


# ------------------------------------------------------------------------------------------- predictions
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_predict_matches_the_python_api(client, run, fmt):
    data, _ = digit_png(3)
    data = png_bytes(np.asarray(Image.open(io.BytesIO(data))), fmt)
    body = post_image(client, f"/api/runs/{RUN}/predict", data, top_k="4").json()
    image = api.decode_image(data, run.image_size, run.channels)
    expected = xailab.predict(run, image, top_k=4)[0]
    assert [c["name"] for c in body["top"]] == [name for name, _ in expected]
    assert [c["probability"] for c in body["top"]] == pytest.approx([p for _, p in expected], abs=1e-6)
    assert [c["index"] for c in body["top"]] == [int(c["name"]) for c in body["top"]]


def test_predict_all_classes_sum_to_one_and_rgb_large_images_are_resized(client, run):
    rgb = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    body = post_image(client, f"/api/runs/{RUN}/predict", png_bytes(rgb), top_k="1000").json()
    probs = [c["probability"] for c in body["top"]]
    assert len(probs) == 10 and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert probs == sorted(probs, reverse=True)
    image = api.decode_image(png_bytes(rgb), run.image_size, run.channels)
    assert image.shape == (1, 28, 28, 1)
    assert probs[0] == pytest.approx(float(xailab.api.class_probabilities(run, image).max()), abs=1e-6)


@pytest.mark.parametrize(("shape", "channels"), [((40, 30, 3), 1), ((40, 30, 3), 3), ((20, 20), 3)])
def test_decode_image_equals_reading_the_file(tmp_path, shape, channels):
    """Bytes decode exactly as ``read_images`` decodes the same file (same conversion and resize)."""
    array = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(array))
    decoded = api.decode_image(path.read_bytes(), (28, 28), channels)
    assert decoded.shape == (1, 28, 28, channels) and decoded.dtype == torch.uint8
    torch.testing.assert_close(decoded, xailab.read_images([path], (28, 28), channels), atol=0, rtol=0)


def test_each_run_is_loaded_once(runs_dir, monkeypatch):
    calls = []
    load = api.load_run
    monkeypatch.setattr(api, "load_run", lambda *a, **k: calls.append(a) or load(*a, **k))
    fresh = TestClient(create_app(runs_dir))
    data, _ = digit_png(0)
    for _ in range(3):
        assert post_image(fresh, f"/api/runs/{RUN}/predict", data).status_code == 200
    assert fresh.post(f"/api/runs/{RUN}/explain", files={"file": ("d.png", data)}).status_code == 200
    assert len(calls) == 1


@pytest.mark.parametrize(("max_batch", "passes"), [(64, [8]), (3, [3, 3, 2]), (1, [1] * 8)])
def test_concurrent_predictions_share_forward_passes(run, monkeypatch, max_batch, passes):
    calls = []
    probabilities = api.class_probabilities
    monkeypatch.setattr(
        api, "class_probabilities", lambda r, x: calls.append(x.shape[0]) or probabilities(r, x)
    )
    batcher = PredictBatcher(run, max_batch)
    images = api.decode_image(digit_png(0)[0], run.image_size, run.channels).repeat(8, 1, 1, 1)
    images[:, :4] = torch.arange(8, dtype=torch.uint8)[:, None, None, None] * 30  # 8 different images
    results: dict[int, torch.Tensor] = {}
    with batcher._lock:  # hold the batch so that all eight requests queue up behind it
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(i, batcher.probabilities(images[i : i + 1]))
            )
            for i in range(8)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while batcher._queue.qsize() < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join()
    assert calls == passes  # e.g. one forward pass answered all eight
    expected = probabilities(run, images).cpu()
    for i in range(8):
        torch.testing.assert_close(results[i][0], expected[i], atol=1e-6, rtol=1e-5)


def test_runs_of_a_study_are_named_by_their_subfolder(runs_dir, tmp_path):
    shutil.copytree(runs_dir / RUN, tmp_path / "grid" / "cell 1")
    client = TestClient(create_app(tmp_path))
    assert [r["run"] for r in client.get("/api/runs").json()] == ["grid/cell 1"]
    data, _ = digit_png(0)
    body = post_image(client, "/api/runs/grid/cell%201/predict", data).json()
    assert body["run"] == "grid/cell 1" and len(body["top"]) == 3
    samples = client.get("/api/runs/grid/cell 1/samples").json()
    assert samples[0]["url"] == "/api/runs/grid/cell%201/samples/0"
    assert client.get(samples[0]["url"]).headers["content-type"] == "image/png"
    assert_error(client.get("/api/runs/grid"), 404, "unknown run 'grid'", "Did you mean 'grid/cell 1'")


# ------------------------------------------------------------------------------------------ explanations
def test_explain_several_methods_overlays_and_raw_maps(client, run):
    data, _ = digit_png(5)
    methods = ["gradcam", "integrated_gradients", "occlusion"]
    response = post_image(client, f"/api/runs/{RUN}/explain", data, methods=",".join(methods), raw="true")
    assert response.status_code == 200, response.text
    body = response.json()
    image = api.decode_image(data, run.image_size, run.channels)
    predicted = int(xailab.api.class_probabilities(run, image).argmax())
    assert body["target"]["index"] == predicted == body["top"][0]["index"]
    assert [m["method"] for m in body["maps"]] == methods
    np.testing.assert_array_equal(decode_data_url(body["image_png"])[..., 0], image[0, :, :, 0].numpy())
    for m in body["maps"]:
        assert decode_data_url(m["overlay_png"]).shape == (28, 28, 3)
        assert decode_data_url(m["heatmap_png"]).shape == (28, 28, 3)
        expected = api.explain_images(run, image, m["method"], predicted)[0, 0].cpu()
        np.testing.assert_allclose(np.array(m["attribution"]), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_explain_target_by_name_alpha_zero_and_no_raw_by_default(client, run):
    data, _ = digit_png(7)
    body = post_image(
        client, f"/api/runs/{RUN}/explain", data, methods="saliency", target="4", alpha="0"
    ).json()
    assert body["target"]["index"] == 4 and body["target"]["name"] == "4"
    (m,) = body["maps"]
    assert m["attribution"] is None
    # alpha 0: the overlay is the input image itself (grey, so equal channels)
    overlay = decode_data_url(m["overlay_png"])
    np.testing.assert_array_equal(overlay, decode_data_url(body["image_png"]))


def test_samples_of_the_runs_dataset(client, run):
    samples = client.get(f"/api/runs/{RUN}/samples").json()
    test = xailab.load_dataset("digits", image_size=run.image_size)["test"]
    assert len(samples) == SAMPLES_PER_RUN
    assert [s["label"] for s in samples] == [str(int(y)) for y in test.labels[: len(samples)]]
    response = client.get(samples[2]["url"])
    assert response.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(response.content))), test.images[2, :, :, 0]
    )
    assert_error(client.get(f"/api/runs/{RUN}/samples/99"), 404, "out of range")


def test_index_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "explainOne" in client.get("/static/app.js").text
    assert client.get("/static/../app.py").status_code == 404


# ------------------------------------------------------------------------------------------------ reports
@pytest.fixture()
def reports_dir(tmp_path):
    study = tmp_path / "runs" / "studies" / "mnist_grid"
    study.mkdir(parents=True)
    (study / "report.html").write_text("<html><body>the mnist study</body></html>")
    (study / "figure.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    (study / "notes.txt").write_text("not a report asset type")
    (tmp_path / "runs" / "nested").mkdir()
    (tmp_path / "secret.html").write_text("outside the runs folder")
    (tmp_path / "runs" / "nested" / "report.html").symlink_to(tmp_path / "secret.html")
    return tmp_path / "runs"


def test_reports_are_listed_and_served(reports_dir):
    client = TestClient(create_app(reports_dir))
    reports = client.get("/api/reports").json()
    assert reports == [{"name": "studies/mnist_grid", "url": "/reports/studies/mnist_grid/report.html"}]
    page = client.get(reports[0]["url"])
    assert page.status_code == 200 and "the mnist study" in page.text
    assert page.headers["content-type"].startswith("text/html")
    assert client.get("/reports/studies/mnist_grid/figure.png").headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    "path",
    [
        "/reports/studies/mnist_grid/notes.txt",  # not an asset type
        "/reports/nested/report.html",  # a symlink leading outside the runs folder
        "/reports/studies/mnist_grid/..%2F..%2F..%2Fsecret.html",
        "/reports/studies/mnist_grid/%2E%2E/%2E%2E/%2E%2E/secret.html",
        "/reports/..%2Fsecret.html",
        "/reports/studies/mnist_grid",
        "/reports/studies/mnist_grid/.hidden.html",
    ],
)
def test_reports_refuse_everything_else(reports_dir, path):
    client = TestClient(create_app(reports_dir))
    assert_error(client.get(path), 404, "no report file")


# -------------------------------------------------------------------------------------------- bad input
def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny (truncated) data chunk."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (b"", ["digit.png", "empty"]),
        (b"just some text, not an image", ["digit.png", "not an image"]),
        (b"%PDF-1.4 a pdf named .png", ["not an image"]),
        (png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8))[:400], ["corrupt"]),
        (png_header(100_000, 100_000), ["decompression bomb"]),  # Pillow's own limit
        (png_header(6_000, 6_000), ["36,000,000 pixels", "over the limit"]),  # ours, below Pillow's
    ],
    ids=["empty", "text", "pdf", "truncated", "pillow-bomb", "over-pixel-limit"],
)
@pytest.mark.parametrize("endpoint", ["predict", "explain"])
def test_bad_images_are_400_with_a_clear_message(client, data, fragments, endpoint):
    assert_error(post_image(client, f"/api/runs/{RUN}/{endpoint}", data), 400, *fragments)


def test_pixel_limit_is_configurable_and_checked_before_decoding(runs_dir, monkeypatch):
    client = TestClient(create_app(runs_dir, max_pixels=100 * 100))
    big = png_bytes(np.zeros((101, 100), np.uint8))
    assert_error(post_image(client, f"/api/runs/{RUN}/predict", big), 400, "10,100 pixels")
    assert (
        post_image(client, f"/api/runs/{RUN}/predict", png_bytes(np.zeros((100, 100), np.uint8))).status_code
        == 200
    )
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the global is left alone


def test_oversized_uploads_are_413(runs_dir):
    client = TestClient(create_app(runs_dir, max_upload_bytes=20_000))
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    data = png_bytes(noise)  # ~120 kB: incompressible
    assert len(data) > 20_000 + FORM_OVERHEAD_BYTES
    assert_error(post_image(client, f"/api/runs/{RUN}/predict", data), 413, "over the limit of")
    # just over the file limit but under the whole-body limit: refused by the file check
    assert_error(post_image(client, f"/api/runs/{RUN}/predict", data[:20_001]), 413, "20,000 bytes")


def test_streamed_body_without_length_is_cut_at_the_limit(runs_dir):
    client = TestClient(create_app(runs_dir, max_upload_bytes=1_000))
    chunks = (b"x" * 10_000 for _ in range(20))  # a generator: sent chunked, no Content-Length
    response = client.post(
        f"/api/runs/{RUN}/predict",
        content=chunks,
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    limit = 1_000 + FORM_OVERHEAD_BYTES  # the file limit plus room for the form around it
    assert_error(response, 413, "request body is over ", f"over the limit of {limit:,}")


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/..%2F..%2Fetc%2Fpasswd/predict",
        "/api/runs/%2E%2E/predict",
        f"/api/runs/{RUN}%2F..%2F{RUN}/predict",
        "/api/runs/%2Fetc%2Fpasswd/predict",
        f"/api/runs/..%2F{RUN}/predict",
    ],
)
def test_path_traversal_run_names_are_unknown_runs(client, path, monkeypatch):
    monkeypatch.setattr(api, "load_run", lambda *a, **k: pytest.fail(f"load_run called with {a}"))
    assert_error(post_image(client, path, digit_png(0)[0]), 404, "unknown run", f"Runs: {RUN}")


@pytest.mark.parametrize(
    ("damage", "fragment"), [(None, "does not exist"), (b"garbage", "not a readable safetensors")]
)
def test_a_broken_run_is_a_clear_error(runs_dir, tmp_path, damage, fragment):
    shutil.copytree(runs_dir / RUN, tmp_path / "broken")
    weights = tmp_path / "broken" / "model.safetensors"
    weights.unlink() if damage is None else weights.write_bytes(damage)
    client = TestClient(create_app(tmp_path))
    assert_error(
        post_image(client, "/api/runs/broken/predict", digit_png(0)[0]), 400, "model.safetensors", fragment
    )


def test_unknown_run_suggests_the_nearest(client):
    assert_error(client.get("/api/runs/tiny_digit/samples"), 404, "unknown run 'tiny_digit'", "Did you mean")
    assert_error(client.get("/api/runs/nothing_like_it"), 404, "unknown run")


def test_unknown_method_suggests_the_nearest(client):
    response = post_image(
        client, f"/api/runs/{RUN}/explain", digit_png(0)[0], methods="gradcam,integrated_gradient"
    )
    assert_error(response, 400, "unknown method 'integrated_gradient'", "Did you mean 'integrated_gradients'")


@pytest.mark.parametrize(
    ("form", "status", "fragment"),
    [
        ({"methods": " , "}, 400, "at least one"),
        ({"methods": ",".join(["gradcam"] * 3 + [f"m{i}" for i in range(20)])}, 400, "at most"),
        ({"target": "11"}, 400, "neither a class name nor an index"),
        ({"target": "-1"}, 400, "neither a class name nor an index"),
        ({"target": "cat"}, 400, "classes are 0, 1"),
        ({"top_k": "0"}, 422, "top_k"),
        ({"alpha": "2"}, 422, "alpha"),
    ],
)
def test_bad_explain_fields(client, form, status, fragment):
    response = post_image(client, f"/api/runs/{RUN}/explain", digit_png(0)[0], **form)
    assert response.status_code == status, response.text
    assert fragment in str(response.json()["detail"])


def test_missing_file_is_422(client):
    response = client.post(f"/api/runs/{RUN}/predict", data={"top_k": "3"})
    assert response.status_code == 422 and "file" in str(response.json()["detail"])


def test_serve_command_binds_to_loopback_by_default(runs_dir, monkeypatch, capsys):
    served = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["serve", "--runs", str(runs_dir), "--port", "8123"]) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8123 and served["workers"] == 1
    rows = TestClient(served["app"]).get("/api/runs").json()
    assert [r["run"] for r in rows] == [RUN]
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out


# ----------------------------------------------------------------------------- broken runs never spread
@pytest.fixture(scope="module")
def mixed_runs_dir(runs_dir, tmp_path_factory):
    """A runs folder with the healthy tiny run, one whose ``metrics.json`` is corrupt and one whose
    ``config.json`` has an empty ``train`` section."""
    root = tmp_path_factory.mktemp("mixed_runs")
    for name in ("good", "bad_metrics", "empty_train"):
        shutil.copytree(runs_dir / RUN, root / name)
    (root / "bad_metrics" / "metrics.json").write_text('{"test": {"accuracy": 0.9')  # cut mid-write
    meta = json.loads((root / "empty_train" / "config.json").read_text())
    (root / "empty_train" / "config.json").write_text(json.dumps({**meta, "train": {}}))
    return root


def test_a_broken_run_folder_is_listed_as_broken_and_spares_the_others(mixed_runs_dir, run):
    client = TestClient(create_app(mixed_runs_dir))
    data, _ = digit_png(2)
    # a healthy run predicts before and after the broken ones are listed, as the Python API does
    expected = xailab.predict(run, api.decode_image(data, run.image_size, run.channels), top_k=3)[0]
    for _ in range(2):
        body = post_image(client, "/api/runs/good/predict", data).json()
        assert [c["name"] for c in body["top"]] == [name for name, _ in expected]
        response = client.get("/api/runs")
        assert response.status_code == 200, response.text
    rows = {r["run"]: r for r in response.json()}
    assert set(rows) == {"good", "bad_metrics", "empty_train"}
    assert rows["good"]["status"] == "finished" and rows["good"]["error"] is None
    assert rows["bad_metrics"]["status"] == "broken" and "metrics.json" in rows["bad_metrics"]["error"]
    assert rows["empty_train"]["status"] == "broken" and "model" in rows["empty_train"]["error"]
    for broken in ("bad_metrics", "empty_train"):
        assert_error(
            post_image(client, f"/api/runs/{broken}/predict", data), 400, f"run {broken!r} is broken"
        )
        assert_error(client.get(f"/api/runs/{broken}"), 400, "is broken")


def test_runs_command_lists_a_broken_run_with_why(mixed_runs_dir, capsys):
    assert main(["runs", "--out", str(mixed_runs_dir)]) == 0
    captured = capsys.readouterr()
    lines = {line.split()[0]: line for line in captured.out.splitlines()[2:]}
    assert (
        "finished" in lines["good"] and "broken" in lines["bad_metrics"] and "broken" in lines["empty_train"]
    )
    assert "broken run bad_metrics: " in captured.err and "metrics.json" in captured.err
    assert "Traceback" not in captured.err


# ------------------------------------------------------------------------- methods: captum, params, fit
def test_captum_methods_are_accepted_like_on_the_command_line(client, run):
    data, _ = digit_png(4)
    response = post_image(client, f"/api/runs/{RUN}/explain", data, methods="captum:Saliency", raw="true")
    assert response.status_code == 200, response.text
    (m,) = response.json()["maps"]
    image = api.decode_image(data, run.image_size, run.channels)
    target = response.json()["target"]["index"]
    expected = api.explain_images(run, image, "captum:Saliency", target)[0, 0].cpu()
    np.testing.assert_allclose(np.array(m["attribution"]), expected.numpy(), rtol=1e-4, atol=1e-6)
    assert_error(
        post_image(client, f"/api/runs/{RUN}/explain", data, methods="captum:Saliancy"),
        400,
        "unknown Captum attribution 'Saliancy'",
        "Did you mean 'Saliency'",
    )


def test_method_params_reach_the_method(client, run):
    data, _ = digit_png(6)
    params = {"integrated_gradients.n_steps": 4, "integrated_gradients.method": "riemann_left"}
    response = post_image(
        client,
        f"/api/runs/{RUN}/explain",
        data,
        methods="integrated_gradients,saliency",
        params=json.dumps(params),
        raw="true",
    )
    assert response.status_code == 200, response.text
    body = response.json()
    image = api.decode_image(data, run.image_size, run.channels)
    target = body["target"]["index"]
    chosen = api.explain_images(
        run, image, "integrated_gradients", target, params={"n_steps": 4, "method": "riemann_left"}
    )[0, 0].cpu()
    default = api.explain_images(run, image, "integrated_gradients", target)[0, 0].cpu()
    got = np.array(body["maps"][0]["attribution"])
    np.testing.assert_allclose(got, chosen.numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(got, default.numpy(), rtol=1e-3, atol=1e-6)  # the params made a difference


@pytest.mark.parametrize(
    ("params", "fragments"),
    [
        ('{"integrated_gradients.n_step": 4}', ["no parameter 'n_step'", "Did you mean 'n_steps'"]),
        ('{"n_steps": "many"}', ["n_steps", "cannot take 'many'"]),
        ('{"no_such_param": 1}', ["none of the chosen methods", "no_such_param"]),
        ('{"gradcam.n_steps": 4}', ["'gradcam' is not among the chosen methods"]),
        ("n_steps=4", ["params: not JSON"]),
        ("[4]", ["expected a JSON object"]),
        ("[" * 5000, ["params:"]),  # nesting deeper than the parser's recursion limit
        ('{"n_steps": 100000}', ["integrated_gradients.n_steps=100000", "over this server's limit"]),
        ('{"n_steps": 0}', ["n_steps=0 is out of range", "valid: in [1, 1000000]"]),
    ],
    ids=[
        "misspelt",
        "bad-type",
        "nobody-takes-it",
        "method-not-chosen",
        "not-json",
        "not-object",
        "deep",
        "too-much-work",
        "out-of-range",
    ],
)
def test_bad_method_params_are_400_naming_the_param(client, params, fragments):
    response = post_image(
        client,
        f"/api/runs/{RUN}/explain",
        digit_png(0)[0],
        methods="integrated_gradients",
        params=params,
    )
    assert_error(response, 400, *fragments)


@pytest.mark.parametrize("target", ["²", "٣", "1_0", "+1", "0x1", "1e0"])
def test_targets_are_parsed_strictly(client, target):
    """``"²".isdigit()`` and ``int("٣")`` are true/3 in Python: only ASCII digits make an index."""
    response = post_image(
        client, f"/api/runs/{RUN}/explain", digit_png(0)[0], methods="saliency", target=target
    )
    assert_error(response, 400, "neither a class name nor an index")


def test_only_the_methods_that_apply_are_offered_for_a_run(client, run):
    expected = applicable_methods(run.model)
    assert expected and set(expected) <= set(xailab.list_methods())
    assert [m["name"] for m in client.get(f"/api/methods?run={RUN}").json()] == expected
    assert client.get(f"/api/runs/{RUN}").json()["methods"] == expected
    assert_error(client.get("/api/methods?run=nope"), 404, "unknown run 'nope'")


def test_a_device_this_machine_lacks_is_refused_up_front(runs_dir):
    with pytest.raises(xailab.errors.ConfigError, match="'banana' is not a device"):
        create_app(runs_dir, device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(xailab.errors.ConfigError, match="'cuda' is not available on this machine"):
            create_app(runs_dir, device="cuda")
