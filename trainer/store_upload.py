"""The artifact store as the trainer writes to it: a directory served over HTTP, or an HTTP PUT endpoint.
A file appears in the store whole or not at all."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
from pydantic import Field, model_validator

from shared.config import ConfigModel, ConfigPath
from shared.reasons import Reason
from trainer.errors import TrainerError


class StoreSettings(ConfigModel):
    """Where model files go: a directory served over HTTP, or an HTTP PUT endpoint (e.g. a WebDAV or
    presigned-S3 style store). ``base_url`` is where devices download the result from."""

    base_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    directory: ConfigPath | None = None
    upload_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = None
    token_file: ConfigPath | None = None

    @model_validator(mode="after")
    def _one_target(self) -> StoreSettings:
        if (self.directory is None) == (self.upload_url is None):
            raise ValueError("set exactly one of store.directory and store.upload_url")
        return self


def object_path(name: str, serial: int, file_name: str) -> str:
    """Where a model's file lies in the store: ``<name>/<serial>/<file>``, the name made path-safe."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}/{serial}/{file_name}"


def upload(store: StoreSettings, source: Path, object_path: str, on_progress: Callable[[int], None]) -> str:
    """Copy or PUT ``source`` to the store; returns the URL devices will download it from."""
    if store.directory is not None:
        target = store.directory / object_path
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with source.open("rb") as reader, partial.open("wb") as writer:
            while chunk := reader.read(1 << 20):
                writer.write(chunk)
                on_progress(len(chunk))
            writer.flush()
            os.fsync(writer.fileno())
        partial.chmod(0o644)
        partial.replace(target)  # a served file is always complete
    elif store.upload_url is not None:
        headers = {"Content-Length": str(source.stat().st_size)}
        if store.token_file is not None:
            headers["Authorization"] = f"Bearer {store.token_file.read_text().strip()}"

        def chunks() -> Any:
            with source.open("rb") as reader:
                while chunk := reader.read(1 << 20):
                    on_progress(len(chunk))
                    yield chunk

        url = f"{store.upload_url.rstrip('/')}/{object_path}"
        try:
            response = httpx.put(url, content=chunks(), headers=headers, timeout=600)
        except httpx.HTTPError as exc:
            raise TrainerError(Reason.UPLOAD_FAILED, f"PUT {url}: {exc}") from exc
        if response.status_code not in (200, 201, 204):
            raise TrainerError(
                Reason.UPLOAD_FAILED, f"PUT {url}: HTTP {response.status_code} {response.text[:200]}"
            )
    return f"{store.base_url.rstrip('/')}/{object_path}"
