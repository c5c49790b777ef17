"""How a model is loaded and listed: the worker's LoadSpec, the health-gate criteria and the
`ServedModel` the router serves, built here and nowhere else for every kind of model (an installed
manifest, a local file for ``immune-edge serve``, an adapter on the served base)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from edge.config import ApiSettings, RuntimeSettings, read_meminfo_mb
from edge.control.activation import ActivationError
from edge.delivery.store import ContentStore
from edge.runtime.handle import WorkerHandle
from edge.runtime.health import GateCriteria
from edge.runtime.protocol import LoadSpec
from edge.runtime.router import ServedModel
from edge.state.ledger import InstalledModel
from shared.manifest import FileRole, Manifest, RuntimeProfile
from shared.reasons import Reason

log = logging.getLogger(__name__)

#: Chat templates are small Jinja files; anything larger is not one.
MAX_TEMPLATE_BYTES = 32 * 1024
#: Beyond the file itself: KV cache, compute buffers and the Python worker (measured ~60-120 MiB
#: for the bundled models at n_ctx 4096).
WORKER_OVERHEAD_MB = 160


@dataclass(frozen=True)
class Plan:
    """What loading an installed model takes: the worker's spec, its gate and its manifest."""

    spec: LoadSpec
    criteria: GateCriteria
    manifest: Manifest


def load_spec(
    settings: RuntimeSettings, path: Path, profile: RuntimeProfile, template: str | None
) -> LoadSpec:
    """How a worker loads a model: the device's runtime settings plus the model's runtime profile.
    The one place both ``run`` (installed models) and ``serve`` (a local file) get their LoadSpec."""
    return LoadSpec(
        model_path=str(path),
        n_ctx=profile.n_ctx,
        n_threads=settings.n_threads,
        n_threads_batch=settings.n_threads_batch,
        n_batch=settings.n_batch,
        chat_format=None if template else profile.chat_format,
        chat_template=template,
        stop=profile.stop,
        prefix_reuse=settings.prefix_reuse,
        prompt_cache_mb=settings.prompt_cache_mb,
    )


def plan_installed(store: ContentStore | None, settings: RuntimeSettings, model: InstalledModel) -> Plan:
    """The plan for an installed model, its files read from the content store."""
    if store is None:
        raise ActivationError(Reason.NO_STORE, "this runtime serves a local file only (immune-edge serve)")
    manifest = model.manifest
    runtime = manifest.runtime
    template = runtime.chat_template
    for entry in manifest.files:
        if entry.role is FileRole.CHAT_TEMPLATE:
            if entry.size > MAX_TEMPLATE_BYTES:
                raise ActivationError(Reason.BAD_TEMPLATE, f"chat template {entry.name} is over 32 KiB")
            template = store.blob_path(entry.sha256).read_text(encoding="utf-8")
    spec = load_spec(settings, store.blob_path(manifest.model_file.sha256), runtime, template)
    gate = manifest.health
    criteria = GateCriteria(
        golden_prompts=tuple(gate.golden_prompts if gate else settings.golden_prompts),
        min_tokens_per_second=gate.min_tokens_per_second if gate else 0.0,
        max_rss_mb=gate.max_rss_mb if gate else None,
        max_tokens=settings.gate_max_tokens,
    )
    return Plan(spec, criteria, manifest)


def fits_beside(settings: RuntimeSettings, procfs_root: Path, manifest: Manifest) -> bool:
    """Whether a worker for ``manifest`` can load while the current one keeps serving."""
    if settings.swap != "auto":
        return settings.swap == "parallel"
    try:
        available = read_meminfo_mb(procfs_root, "MemAvailable")
    except (OSError, ValueError) as exc:
        log.warning("cannot read MemAvailable (%s): swapping sequentially", exc)
        return False
    needed = manifest.model_file.size // (1024 * 1024) + WORKER_OVERHEAD_MB
    return available >= needed + settings.swap_headroom_mb


def served_base(
    name: str,
    worker: WorkerHandle,
    spec: LoadSpec,
    profile: RuntimeProfile,
    api: ApiSettings,
    manifest: Manifest | None = None,
    key: tuple[str, int] | None = None,
    created: int | None = None,
) -> ServedModel:
    """A base model as the router serves it: an installed one (``manifest``, ``key``) or the local
    file of ``immune-edge serve`` (neither: its listing has no sha256 or quantization)."""
    return ServedModel(
        name=name,
        worker=worker,
        n_ctx=spec.n_ctx,
        max_tokens_cap=api.max_tokens_cap,
        created=int(time.time()) if created is None else created,
        aliases=api.aliases_for(name),
        defaults=profile.sampling.model_dump(),
        system_prompt=profile.system_prompt,
        key=key,
        size_bytes=manifest.model_file.size if manifest else Path(spec.model_path).stat().st_size,
        sha256=manifest.model_file.sha256 if manifest else "",
        quantization=str(manifest.quantization) if manifest else "",
        chat_format=spec.chat_format or "template",
    )


def served_adapter(
    base: ServedModel,
    name: str,
    adapter: str,
    aliases: tuple[str, ...] = (),
    profile: RuntimeProfile | None = None,
    size_bytes: int = 0,
    sha256: str = "",
    key: tuple[str, int] | None = None,
) -> ServedModel:
    """An adapter on ``base``: the base's worker and limits, its own names, sampling and statistics."""
    return ServedModel(
        name=name,
        worker=base.worker,
        n_ctx=base.n_ctx,
        max_tokens_cap=base.max_tokens_cap,
        created=int(time.time()),
        aliases=aliases,
        defaults=profile.sampling.model_dump() if profile else base.defaults,
        system_prompt=profile.system_prompt if profile else base.system_prompt,
        size_bytes=size_bytes,
        sha256=sha256,
        quantization=base.quantization,
        chat_format=base.chat_format,
        adapter=adapter,
        key=key,
    )
