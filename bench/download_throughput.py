"""Download throughput of the device's downloader (hashing while writing, fsync, atomic admit)
against curl fetching the same file from the same loopback server in the same run.

Also measures the resume overhead: bytes the server sent beyond the file size when the
connection drops at 40 % and the download resumes.
Run: .venv/bin/python -m bench.download_throughput
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from edge.delivery.downloader import Downloader, DownloadPolicy
from edge.delivery.store import ContentStore
from shared.artifacts import describe_artifact
from tests.harness.artifact_server import ArtifactServer, Fault
from tests.harness.models import smollm2_gguf

REPEATS = 5


def main() -> None:
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is needed for the baseline: apt install curl")
    model = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp, ArtifactServer(Path(tmp) / "srv") as server:
        url = server.add_file(model, "m.gguf")
        entry = describe_artifact(model, [url])
        curl_times, ours = [], []
        for run in range(REPEATS):
            start = time.perf_counter()
            subprocess.run([curl, "-sf", "-o", str(Path(tmp) / "curl.out"), url], check=True)
            curl_times.append(time.perf_counter() - start)
            store = ContentStore(Path(tmp) / f"store-{run}")
            start = time.perf_counter()
            Downloader(store, DownloadPolicy(free_space_margin_bytes=0)).fetch(entry)
            ours.append(time.perf_counter() - start)
            shutil.rmtree(store.root, ignore_errors=True)
        baseline, mine = statistics.median(curl_times), statistics.median(ours)
        size_mb = entry.size / 1e6
        print(f"file: {model.name}, {size_mb:.0f} MB, {REPEATS} runs each, medians")
        print(f"curl -o (baseline):                 {baseline:.3f} s  ({size_mb / baseline:.0f} MB/s)")
        print(f"Downloader.fetch (hash+fsync+admit): {mine:.3f} s  ({size_mb / mine:.0f} MB/s)")
        print(f"ratio downloader/curl: {mine / baseline:.2f}")

        resume_store = ContentStore(Path(tmp) / "store-resume")
        before = server.bytes_sent("m.gguf")
        server.inject("m.gguf", Fault("truncate", after_bytes=int(entry.size * 0.4)))
        Downloader(resume_store, DownloadPolicy(free_space_margin_bytes=0, backoff_initial_s=0.01)).fetch(
            entry
        )
        extra = server.bytes_sent("m.gguf") - before - entry.size
        print(
            f"resume after a drop at 40 %: {extra} extra bytes ({100 * extra / entry.size:.3f} % of the file)"
        )


if __name__ == "__main__":
    main()
