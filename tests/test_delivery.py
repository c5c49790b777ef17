"""Device-side delivery pieces against a real HTTP server: downloader, store, GGUF header check."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from edge.delivery.downloader import Downloader, DownloadError, DownloadInterruptedError, DownloadPolicy
from edge.delivery.store import ContentStore
from shared.errors import ArtifactError, ContractError
from shared.gguf import read_gguf_header
from shared.manifest import ArtifactFile
from shared.reasons import Reason
from tests.factories import gguf_bytes
from tests.harness.artifact_server import ArtifactServer, Fault
from tests.harness.waiting import wait_until

# Fast retries; a stall timeout no busy 2-core machine reaches between two chunks of a healthy
# download, so the tests' exact request lists hold. The stall test sets its own, shorter one.
FAST = DownloadPolicy(attempts=4, backoff_initial_s=0.01, stall_timeout_s=15.0, free_space_margin_bytes=0)
STALLING = DownloadPolicy(attempts=4, backoff_initial_s=0.01, stall_timeout_s=3.0, free_space_margin_bytes=0)


def entry_for(data: bytes, *urls: str, name: str = "model.gguf") -> ArtifactFile:
    return ArtifactFile.model_validate(
        {
            "name": name,
            "role": "model",
            "media_type": "application/x-gguf",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "urls": list(urls),
        },
        strict=False,
    )


@pytest.fixture
def blob() -> bytes:
    return os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def test_download_hashes_and_admits_to_the_store(artifact_server, store, blob) -> None:
    entry = entry_for(blob, artifact_server.add("m.gguf", blob))
    seen: list[int] = []
    path = Downloader(store, FAST).fetch(entry, on_progress=lambda done, total: seen.append(done))
    assert path == store.blob_path(entry.sha256)
    assert path.read_bytes() == blob
    assert oct(path.stat().st_mode & 0o777) == "0o444"
    assert seen[-1] == len(blob)
    assert list(store.partials.iterdir()) == []
    assert Downloader(store, FAST).fetch(entry) == path  # already stored: no request
    assert len(artifact_server.requests) == 1


def test_truncated_transfer_resumes_with_a_range_request(artifact_server, store, blob) -> None:
    entry = entry_for(blob, artifact_server.add("m.gguf", blob))
    artifact_server.inject("m.gguf", Fault("truncate", after_bytes=1_000_000))
    Downloader(store, FAST).fetch(entry)
    assert [r.range for r in artifact_server.requests] == [None, "bytes=1000000-"]
    assert artifact_server.bytes_sent("m.gguf") == len(blob)  # nothing fetched twice


def test_stalled_server_is_dropped_and_resumed(artifact_server, store, blob) -> None:
    entry = entry_for(blob, artifact_server.add("m.gguf", blob))
    artifact_server.inject("m.gguf", Fault("stall", after_bytes=500_000, delay_s=60))
    Downloader(store, STALLING).fetch(entry)
    assert [r.range for r in artifact_server.requests] == [None, "bytes=500000-"]


def test_server_errors_then_recovery(artifact_server, store, blob) -> None:
    entry = entry_for(blob, artifact_server.add("m.gguf", blob))
    artifact_server.inject("m.gguf", Fault("fail", status=500, times=2))
    assert Downloader(store, FAST).fetch(entry).read_bytes() == blob
    assert [r.status for r in artifact_server.requests] == [500, 500, 200]


def test_falls_back_to_a_second_mirror(tmp_path, artifact_server, store, blob) -> None:
    with ArtifactServer(tmp_path / "mirror") as mirror:
        entry = entry_for(blob, artifact_server.url("missing.gguf"), mirror.add("m.gguf", blob))
        assert Downloader(store, FAST).fetch(entry).read_bytes() == blob


def test_endless_data_is_cut_at_the_declared_length(artifact_server, store, blob) -> None:
    entry = entry_for(blob, artifact_server.add("m.gguf", blob))
    artifact_server.inject("m.gguf", Fault("overflow", times=10))
    with pytest.raises(DownloadError, match="server sent more than the declared") as err:
        Downloader(store, FAST).fetch(entry)
    assert err.value.reason == "too-long"
    assert not store.has(entry.sha256)
    assert list(store.partials.iterdir()) == []
    # The client hung up: the server sent only what socket buffers absorbed, not an endless stream.
    assert artifact_server.bytes_sent("m.gguf") < len(blob) + 16 * 1024 * 1024


def test_corrupted_bytes_never_enter_the_store(artifact_server, store, blob) -> None:
    entry = entry_for(blob, artifact_server.add("m.gguf", blob))
    artifact_server.inject("m.gguf", Fault("corrupt", after_bytes=12345, times=10))
    with pytest.raises(DownloadError, match="sha256 is .*manifest says") as err:
        Downloader(store, FAST).fetch(entry)
    assert err.value.reason == "hash-mismatch"
    assert list(store.blobs.iterdir()) == [] and list(store.partials.iterdir()) == []


def test_server_declaring_another_size_is_refused(artifact_server, store, blob) -> None:
    entry = entry_for(blob, artifact_server.add("m.gguf", blob + b"extra"))
    with pytest.raises(DownloadError, match="server declares .* manifest says") as err:
        Downloader(store, FAST).fetch(entry)
    assert err.value.reason == "size-mismatch"


def test_not_enough_disk_space_fails_before_any_request(artifact_server, store, blob) -> None:
    entry = entry_for(blob, artifact_server.add("m.gguf", blob))
    policy = DownloadPolicy(free_space_margin_bytes=1 << 60)
    with pytest.raises(DownloadInterruptedError, match="needs .* bytes free") as err:
        Downloader(store, policy).fetch(entry)
    assert err.value.reason is Reason.DISK_SPACE
    assert not isinstance(err.value, ContractError)  # transient: retried, never refused as bad input
    assert artifact_server.requests == []


_KILLED_DOWNLOAD = """
import sys
from pathlib import Path
from edge.delivery.downloader import Downloader, DownloadPolicy
from edge.delivery.store import ContentStore
from shared.manifest import ArtifactFile
entry = ArtifactFile.model_validate_json(sys.argv[2])
Downloader(ContentStore(Path(sys.argv[1])), DownloadPolicy(free_space_margin_bytes=0)).fetch(entry)
"""


def test_process_killed_mid_download_resumes_with_little_extra(tmp_path, artifact_server, blob) -> None:
    """SIGKILL during a slow download; a new process resumes from the partial file's bytes."""
    data = blob * 3
    entry = entry_for(data, artifact_server.add("m.gguf", data))
    artifact_server.inject("m.gguf", Fault("slow", rate_bps=4 * 1024 * 1024))
    root = tmp_path / "store"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_DOWNLOAD, str(root), entry.model_dump_json()])
    partial = ContentStore(root).partial_path(entry.sha256)
    wait_until(
        lambda: partial.exists() and partial.stat().st_size >= len(data) // 3, 20, "a third downloaded"
    )
    child.kill()
    child.wait()
    kept = partial.stat().st_size
    assert 0 < kept < len(data)
    sent_before = artifact_server.bytes_sent("m.gguf")
    path = Downloader(ContentStore(root), FAST).fetch(entry)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    assert artifact_server.requests[-1].range == f"bytes={kept}-"
    extra = sent_before + (len(data) - kept) - len(data)
    assert extra <= 0.05 * len(data), f"{extra} extra bytes"


def test_store_gc_keeps_wanted_and_in_use_blobs(store) -> None:
    for digest in ("a" * 64, "b" * 64, "c" * 64):
        store.blob_path(digest).write_bytes(b"x")
    store.partial_path("d" * 64).write_bytes(b"x")
    store.partial_path("e" * 64).write_bytes(b"x")
    removed = store.collect_garbage(keep={"a" * 64, "e" * 64}, in_use={"b" * 64})
    assert sorted(removed) == sorted(["c" * 64, "d" * 64 + ".part"])
    assert store.has("a" * 64) and store.has("b" * 64) and store.partial_path("e" * 64).exists()


def test_a_read_only_seed_is_linked_not_copied_and_a_writable_one_is_copied(tmp_path, blob) -> None:
    """N simulated devices (or a device image's baked-in models) share one read-only copy: the store
    links it, with no second copy on disk; a seed anyone could still write to is copied instead."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    digest = hashlib.sha256(blob).hexdigest()
    seed = seeds / digest
    seed.write_bytes(blob)
    seed.chmod(0o444)
    stores = [ContentStore(tmp_path / f"device-{i}", [tmp_path / "absent", seeds]) for i in range(3)]
    paths = [store.from_seed(digest, len(blob)) for store in stores]
    assert all(p is not None and p.read_bytes() == blob for p in paths)
    assert {p.stat().st_ino for p in paths if p} == {seed.stat().st_ino} and seed.stat().st_nlink == 4
    stores[0].collect_garbage(keep=())
    assert seed.read_bytes() == blob, "dropping a device's link leaves the shared copy"
    seed.chmod(0o644)
    copied = ContentStore(tmp_path / "device-w", [seeds]).from_seed(digest, len(blob))
    assert copied is not None and copied.stat().st_ino != seed.stat().st_ino and copied.read_bytes() == blob


@pytest.mark.parametrize("writable", [False, True])
def test_a_seed_that_is_not_what_its_name_says_is_not_used(tmp_path, blob, writable, caplog) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    digest = hashlib.sha256(blob).hexdigest()
    (seeds / digest).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    (seeds / digest).chmod(0o644 if writable else 0o444)
    store = ContentStore(tmp_path / "device", [seeds])
    assert store.from_seed(digest, len(blob)) is None
    assert not store.has(digest) and not any(store.partials.iterdir())
    assert f"seed {seeds / digest} not used" in caplog.text
    assert f"sha256 is {hashlib.sha256((seeds / digest).read_bytes()).hexdigest()}" in caplog.text
    assert store.from_seed(hashlib.sha256(b"other").hexdigest(), 5) is None  # not in any seed


def test_real_models_pass_the_gguf_header_check(smollm2_model, gemma3_model) -> None:
    assert read_gguf_header(smollm2_model).architecture == "llama"
    assert read_gguf_header(gemma3_model).architecture == "gemma3"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"PK\x03\x04" + b"\0" * 60, "magic bytes are not 'GGUF'"),
        (gguf_bytes(version=99), "version 99 is not supported"),
        (gguf_bytes(tensors=0), "tensor count 0 is outside"),
        (gguf_bytes(tensors=10**9), "tensor count 1000000000 is outside"),
        (gguf_bytes()[:30], "header is truncated"),
        (
            gguf_bytes(kvs=[("general.name", 8, struct.pack("<Q", 2**40))]),
            "metadata string of 1099511627776 bytes",
        ),
        (
            gguf_bytes(kvs=[("general.name", 8, struct.pack("<Q", 1) + b"x")]),
            "general.architecture is missing",
        ),
        (
            gguf_bytes(kvs=[("general.architecture", 8, struct.pack("<Q", 5) + b"bert2")]),
            "architecture 'bert2' is not allowed",
        ),
    ],
)
def test_hostile_gguf_headers_are_refused(tmp_path, data: bytes, problem: str) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    with pytest.raises(ArtifactError, match=problem) as err:
        read_gguf_header(path)
    assert err.value.reason == "bad-gguf"
