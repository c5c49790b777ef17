"""``publish`` to an HTTP PUT artifact store with a token file (the `store.upload_url` form of
publish.toml): a real PUT server on loopback that requires the bearer token receives the file whole;
a wrong token and a store that is down are refused with the URL and the cause named."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.harness.net import free_port
from trainer.errors import TrainerError
from trainer.store_upload import StoreSettings, upload

TOKEN = "store-token-0123456789abcdef"


class _PutStore(BaseHTTPRequestHandler):
    root: Path

    def do_PUT(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b"bad token")
            return
        target = self.root / self.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def put_store(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "received"
    handler = type("Handler", (_PutStore,), {"root": root})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/upload", root
    finally:
        server.shutdown()
        server.server_close()


def _settings(url: str, token_file: Path) -> StoreSettings:
    return StoreSettings(base_url="http://models.lab/files", upload_url=url, token_file=token_file)


def test_a_put_store_with_a_token_file_receives_the_whole_file(put_store, tmp_path: Path) -> None:
    url, root = put_store
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")  # a trailing newline, as editors leave it
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 9000)
    sent: list[int] = []
    where = upload(_settings(url, token), model, "slips_smollm2/7/model.gguf", sent.append)
    assert where == "http://models.lab/files/slips_smollm2/7/model.gguf"
    assert (root / "upload/slips_smollm2/7/model.gguf").read_bytes() == model.read_bytes()
    assert sum(sent) == model.stat().st_size


def test_a_wrong_token_and_a_store_that_is_down_are_named(put_store, tmp_path: Path) -> None:
    url, root = put_store
    token = tmp_path / "token"
    token.write_text("not-the-token")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 1024)
    with pytest.raises(TrainerError, match=r"PUT .*/upload/m/1/model.gguf: HTTP 401 bad token") as refused:
        upload(_settings(url, token), model, "m/1/model.gguf", lambda n: None)
    assert refused.value.reason == "upload-failed" and not root.exists()
    down = f"http://127.0.0.1:{free_port()}/upload"
    with pytest.raises(TrainerError, match=r"PUT http://127\.0\.0\.1:\d+/upload/m/1/model.gguf: ") as failed:
        upload(_settings(down, token), model, "m/1/model.gguf", lambda n: None)
    assert failed.value.reason == "upload-failed"
