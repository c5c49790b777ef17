"""How much does checking a signed manifest cost next to hashing the model it describes?

Baseline, measured in the same run: sha256 over the real SmolLM2 GGUF (what a device must do
anyway). Printed: each step's median time and its ratio to the baseline.
Run: .venv/bin/python -m bench.verify_cost
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from shared.admission import verify_manifest
from shared.artifacts import describe_artifact, sha256_file
from shared.manifest import MANIFEST_PAYLOAD_TYPE, Manifest
from shared.signing import Keyring, Role, TrustedKey, generate_key, sign_envelope
from tests.harness.models import smollm2_gguf


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    model = smollm2_gguf()
    key = generate_key()
    root = generate_key()
    keyring = Keyring(
        version=1,
        keys=[
            TrustedKey(keyid=key.keyid, role=Role.TRAINER, public_key=key.public_b64),
            TrustedKey(keyid=root.keyid, role=Role.ROOT, public_key=root.public_b64),
        ],
    )
    now = datetime.now(UTC)
    manifest = Manifest.model_validate(
        {
            "name": "bench",
            "channel": "stable",
            "serial": 1,
            "version": "1",
            "created_at": now,
            "expires_at": now.replace(year=now.year + 1),
            "base_model": "b",
            "task": "slips-summary",
            "quantization": "q4_1",
            "files": [describe_artifact(model, ["http://127.0.0.1/m.gguf"])],
            "runtime": {"chat_format": "chatml"},
        },
        strict=False,
    )
    envelope_bytes = sign_envelope(manifest.to_json(), MANIFEST_PAYLOAD_TYPE, [key]).to_json()

    baseline = median_seconds(lambda: sha256_file(model), 5)
    steps = {
        "verify_manifest (parse + ed25519 + schema + expiry)": median_seconds(
            lambda: verify_manifest(envelope_bytes, keyring), 200
        ),
    }
    print(f"baseline: sha256 of {model.name} ({model.stat().st_size / 1e6:.0f} MB): {baseline * 1e3:.1f} ms")
    for name, seconds in steps.items():
        print(f"{name}: {seconds * 1e6:.0f} us = {seconds / baseline:.5f} x baseline")


if __name__ == "__main__":
    main()
