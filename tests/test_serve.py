"""The HTTP service: good uploads of every kind, a 4xx JSON answer for every kind of bad one, concurrency."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import serve_in_process, serve_in_thread, synthetic_arrays, write_dataset
from kmnist.errors import KmnistError
from kmnist.imageprep import prepare_bytes
from kmnist.predict import Classifier
from kmnist.serve import ServeOptions, bind_socket, create_app

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx`")  # Starlette prefers httpx2; httpx works the same
    from starlette.testclient import TestClient

UPLOAD_LIMIT = 200_000  # bytes, small so the tests stay fast
PIXEL_LIMIT = 1_000_000


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return synthetic_arrays(24, 10, seed=7)[0]


@pytest.fixture(scope="module")
def app(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    data = write_dataset(tmp_path_factory.mktemp("data"))
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):  # the test split is all it needs
        (data / "kmnist" / name).unlink()
    return create_app(tiny_checkpoint, ServeOptions(data_dir=data, check_md5=False, max_upload_bytes=UPLOAD_LIMIT,
                                                    max_pixels=PIXEL_LIMIT))


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint: Path) -> Classifier:
    return Classifier.from_file(tiny_checkpoint)


def expected_top(classifier: Classifier, data: bytes, k: int = 5) -> list[int]:
    return [entry["class_index"] for entry in classifier.top_k(classifier.probabilities(prepare_bytes(data)[None])[0], k)]


def test_health_info_and_page(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "model": "report-mixer", "dataset": "kmnist",
                                             "num_classes": 10}
    info = client.get("/info").json()
    assert [c["character"] for c in info["classes"]][:3] == ["お", "き", "す"] and info["examples"] is True
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="board"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_openapi_docs_work_offline(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "image/*"}
    docs = client.get("/docs").text
    script = docs.split('<script src="')[1].split('"')[0]
    assert script.startswith("/") and client.get(script).status_code == 200  # served here, not from a CDN


def test_good_uploads_of_every_kind(client: TestClient, classifier: Classifier, images: np.ndarray) -> None:
    character = images[0]
    png = encode(Image.fromarray(character))
    expected = expected_top(classifier, png)
    transparent = Image.new("RGBA", (28, 28), (0, 0, 0, 0))
    transparent.putalpha(Image.fromarray(character))  # black ink on a transparent canvas
    uploads = [
        {"files": {"file": ("c.png", png, "image/png")}},
        {"content": png, "headers": {"content-type": "image/png"}},
        {"content": png, "headers": {"content-type": "application/octet-stream"}},
        {"content": encode(transparent), "headers": {"content-type": "image/png"}},
        {"files": {"file": ("c.webp", encode(Image.fromarray(character), "WEBP", lossless=True), "image/webp")}},
    ]
    for upload in uploads:
        response = client.post("/predict", **upload)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert [entry["class_index"] for entry in answer["top"]] == expected
        assert sum(entry["probability"] for entry in answer["top"]) <= 1 + 1e-6
    jpeg = encode(Image.fromarray(255 - character).convert("RGB"), "JPEG", quality=90)
    answer = client.post("/predict?top_k=3&include_input=true", content=jpeg,
                         headers={"content-type": "image/jpeg"}).json()
    assert [entry["class_index"] for entry in answer["top"]] == expected_top(classifier, jpeg, 3)
    assert np.array(answer["input"]).shape == (28, 28)


def chunks(total: int):
    for _ in range(total // 65536 + 1):
        yield b"\0" * 65536


BOMB = encode(Image.new("L", (2000, 2000)))  # 4 megapixels in a few kilobytes
NOISE = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100), dtype=np.uint8)))


@pytest.mark.parametrize("request_args, status, code", [
    ({"content": b"\0" * (UPLOAD_LIMIT + 1), "headers": {"content-type": "image/png"}}, 413, "too_large"),
    ({"content": chunks(UPLOAD_LIMIT * 3), "headers": {"content-type": "image/png"}}, 413, "too_large"),  # chunked
    ({"files": {"file": ("big.png", b"\0" * UPLOAD_LIMIT, "image/png")}}, 413, "too_large"),
    ({"content": BOMB, "headers": {"content-type": "image/png"}}, 413, "too_many_pixels"),
    ({"content": b"GIF89a but not really", "headers": {"content-type": "image/gif"}}, 415, "not_an_image"),
    ({"files": {"file": ("notes.txt", b"some text", "text/plain")}}, 415, "not_an_image"),
    ({"content": NOISE[:len(NOISE) // 2], "headers": {"content-type": "image/png"}}, 415, "not_an_image"),  # truncated
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    ({"files": {"file": ("empty.png", b"", "image/png")}}, 400, "empty"),
    ({"files": {"picture": ("c.png", b"\x89PNG", "image/png")}}, 400, "missing_file"),
    ({"data": {"file": "a text field, not a file"}}, 415, "unsupported_content_type"),  # form-urlencoded
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400, "bad_request"),
    ({"content": b'--XX\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n'  # cut short
                 b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n",
      "headers": {"content-type": "multipart/form-data; boundary=XX"}}, 400, "bad_request"),
    ({"json": {"image": "base64..."}}, 415, "unsupported_content_type"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_content_type"),
    ({"content": b"\x89PNG"}, 415, "unsupported_content_type"),  # no content type at all
    ({"content": encode(Image.new("L", (64, 64), 255)), "headers": {"content-type": "image/png"}}, 422,
     "blank_image"),
])
def test_bad_input_gets_a_4xx_json_error(client: TestClient, request_args: dict, status: int, code: str) -> None:
    response = client.post("/predict", **request_args)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["code"] == code and answer["detail"]


@pytest.mark.parametrize("path, status", [("/predict?top_k=0", 422), ("/predict?top_k=11", 422),
                                          ("/predict?top_k=many", 422)])
def test_bad_parameters(client: TestClient, images: np.ndarray, path: str, status: int) -> None:
    response = client.post(path, content=encode(Image.fromarray(images[1])), headers={"content-type": "image/png"})
    assert response.status_code == status and response.json()["code"] == "invalid_parameter"


def test_wrong_method_and_path_are_json(client: TestClient) -> None:
    assert client.get("/predict").json()["code"] == "method_not_allowed"
    assert client.get("/nothing-here").json()["code"] == "not_found"


def test_random_test_image(client: TestClient, tiny_checkpoint: Path) -> None:
    example = client.get("/examples/random").json()
    assert np.array(example["pixels"]).shape == (28, 28) and 0 <= example["class_index"] < 10
    assert 0 <= example["index"] < 200  # the synthetic test split
    without_data = create_app(tiny_checkpoint, ServeOptions(data_dir=None))
    with TestClient(without_data) as bare:
        assert bare.get("/info").json()["examples"] is False
        response = bare.get("/examples/random")
        assert response.status_code == 404 and response.json()["code"] == "no_examples"


def test_concurrent_requests_on_a_real_socket(app, classifier: Classifier, images: np.ndarray) -> None:
    """Eight clients at once, good and bad uploads mixed: each answer is the one a lone request gets."""
    uploads = [encode(Image.fromarray(image if i % 2 else 255 - image)) for i, image in enumerate(images)]
    expected = [expected_top(classifier, data) for data in uploads]

    def client_run(worker: int) -> list[tuple[int, list[int] | str]]:
        answers = []
        with httpx.Client(base_url=url, timeout=30) as http:
            for index in range(worker, len(uploads), 8):
                good = http.post("/predict", content=uploads[index], headers={"content-type": "image/png"})
                bad = http.post("/predict", content=b"junk", headers={"content-type": "image/png"})
                answers.append((index, [e["class_index"] for e in good.json()["top"]]))
                answers.append((bad.status_code, bad.json()["code"]))
        return answers

    with serve_in_thread(app) as url:
        assert url.startswith("http://127.0.0.1:")
        with ThreadPoolExecutor(8) as pool:
            results = [answer for answers in pool.map(client_run, range(8)) for answer in answers]
    good = [(index, top) for index, top in results if isinstance(top, list)]
    assert sorted(index for index, _ in good) == list(range(len(uploads)))
    assert all(top == expected[index] for index, top in good)
    assert all(answer == (415, "not_an_image") for answer in results if not isinstance(answer[1], list))


def test_serve_command_on_loopback_and_a_busy_port(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`kmnist serve --port 0` reports its address, which answers at once (no retrying: the socket listens before the
    line is printed); a second one on that port fails in one line."""
    with serve_in_process([str(tiny_checkpoint)], tmp_path / "stderr.txt") as url:
        assert url.startswith("http://127.0.0.1:"), url
        port = url.rsplit(":", 1)[1]
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()  # refused if it were not listening yet
        health = httpx.get(url + "/health", timeout=60)  # waits in the backlog while uvicorn starts
        assert health.json()["status"] == "ok"
        busy = subprocess.run([sys.executable, "-m", "kmnist", "serve", str(tiny_checkpoint), "--port", port],
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and busy.stderr.count("\n") == 1
        assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "Traceback" not in busy.stderr


@pytest.mark.parametrize("port", [-1, 65536, 99999])
def test_a_port_out_of_range_is_a_one_line_error(port: int) -> None:
    """Not a wrapped-around port (99999 would listen on 34463) nor a resolver message."""
    with pytest.raises(KmnistError, match=f"port must be between 0 and 65535 .*got {port}$"):
        bind_socket("127.0.0.1", port)


def test_load_script_counts_requests_and_errors(app) -> None:
    """benchmarks/load_serve.py's client loop, briefly, so the acceptance script keeps working."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load_serve.py"
    spec = importlib.util.spec_from_file_location("load_serve", path)
    load_serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_serve)
    uploads, _ = load_serve.test_images(None, 5)
    with serve_in_thread(app) as url:
        good = load_serve.run_load(url, uploads, requests=40, clients=4, time_limit=60)
        bad = load_serve.run_load(url, [b"not an image"], requests=6, clients=2, time_limit=60)
    assert good["requests_sent"] == 40 and good["errors"] == 0 and good["latency_ms"]["p99"] > 0
    assert bad["requests_sent"] == 6 and bad["errors"] == 6 and bad["first_errors"][0] == "status 415"


def test_a_malformed_multipart_body_is_a_400_and_no_log_line(client: TestClient, caplog) -> None:
    with caplog.at_level("DEBUG"):
        response = client.post("/predict", content=b"--xyz\r\nbroken",
                               headers={"Content-Type": "multipart/form-data; boundary=abc"})
    assert response.status_code == 400 and response.json()["code"] == "bad_request"
    assert not [r for r in caplog.records if r.name.startswith("python_multipart") and r.levelno >= 30]
