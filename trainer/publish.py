"""``immune-train publish``: put an evaluated GGUF on the artifact store, describe it in a manifest
(runtime profile, eval scores, provenance), sign it with the trainer key(s) and publish it retained
on the fleet's or a group's desired-state topic."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from shared.admission import verify_manifest
from shared.config import ConfigModel, ConfigPath, MqttSettings, load_config
from shared.manifest import (
    MANIFEST_PAYLOAD_TYPE,
    BaselineComparison,
    BaseModelRef,
    HealthGate,
    Manifest,
    Quantization,
    RuntimeProfile,
    TargetChoice,
)
from shared.manifest_builder import (
    DEFAULT_CHANNEL,
    DEFAULT_CPU_ARCH,
    DEFAULT_LIFETIME_DAYS,
    DEFAULT_N_CTX,
    DEFAULT_TASK,
    ManifestSpec,
    build_manifest,
)
from shared.mqtt import mqtt_client
from shared.reasons import Reason
from shared.schema import Identifier
from shared.signing import Envelope, Keyring, Role, SigningKey, sign_envelope
from shared.signing.keys import load_private_key
from shared.topics import Topics
from trainer.errors import TrainerError
from trainer.evaluate import load_eval
from trainer.export_folder import find_gguf, read_export_report
from trainer.gate import GateSettings, apply_gate
from trainer.gguf_check import chat_template_of, tensor_types
from trainer.layout import ExportLayout
from trainer.records import EvalReport, ExportedAdapter, PublishedRecord, QuantScores
from trainer.store_upload import StoreSettings, object_path, upload
from trainer.targets import DeviceTarget, get_target, rank_for_target, target_cost, tensor_elements

log = logging.getLogger(__name__)


class PublishSettings(ConfigModel):
    """``publish.toml`` on the trainer machine."""

    fleet: Identifier
    #: Trainer private keys (mode 0600); the manifest is signed by all of them (threshold signing).
    trainer_keys: Annotated[list[ConfigPath], Field(min_length=1, max_length=8)]
    #: The fleet's trusted keyring: the signed manifest is verified against it before it is published.
    keyring_file: ConfigPath
    client_id: Identifier = "trainer"
    mqtt: MqttSettings = MqttSettings()
    store: StoreSettings
    gate: GateSettings = GateSettings()
    #: Signed into every manifest: the golden prompts, tokens/s floor and RSS budget a device checks
    #: a new model or adapter against before it gets traffic (absent: the device's configured gate).
    health: HealthGate | None = None


def load_publish_settings(path: Path) -> PublishSettings:
    return load_config(path, PublishSettings)


@dataclass
class PublishRequest:
    export_dir: Path
    quant: Quantization
    name: str
    serial: int
    channel: str = DEFAULT_CHANNEL
    group: str | None = None
    task: str = DEFAULT_TASK
    base_model: str = "unknown"
    n_ctx: int = DEFAULT_N_CTX
    system_prompt: str | None = None
    cpu_arch: tuple[str, ...] = DEFAULT_CPU_ARCH
    #: None: derived from the file and the KV cache at n_ctx (shared.gguf.minimum_ram_mb).
    min_ram_mb: int | None = None
    expires_in_days: int = DEFAULT_LIFETIME_DAYS
    provenance: dict[str, Any] | None = None
    #: Publish the LoRA adapter ``export --adapter`` wrote (bound to its base) instead of a merged file.
    adapter: bool = False
    #: A device target (trainer.targets): publish its fastest candidate that passes, not ``quant``.
    target: str | None = None


def trainer_keys(settings: PublishSettings, keyring: Keyring) -> list[SigningKey]:
    """Load the signing keys and refuse any that this fleet does not trust as a trainer."""
    keys: list[SigningKey] = []
    for path in settings.trainer_keys:
        if not path.is_file():
            raise TrainerError(Reason.MISSING_KEY, f"{path}: trainer key file not found")
        key = load_private_key(path)
        trusted = keyring.find(key.keyid)
        if trusted is None:
            raise TrainerError(
                Reason.UNKNOWN_KEY,
                f"{path}: key {key.keyid[:12]} is not in the keyring {settings.keyring_file}",
            )
        if trusted.role is not Role.TRAINER:
            raise TrainerError(
                Reason.WRONG_ROLE,
                f"{path}: key {trusted.label} has role {trusted.role.value}, manifests need a trainer key",
            )
        keys.append(key)
    needed = keyring.thresholds.of(Role.TRAINER)
    if len({key.keyid for key in keys}) < needed:
        raise TrainerError(
            Reason.THRESHOLD, f"the keyring needs {needed} distinct trainer keys, {len(keys)} given"
        )
    return keys


def build_publish_manifest(
    request: PublishRequest,
    gguf: Path,
    url: str,
    scores: QuantScores,
    comparison: BaselineComparison | None = None,
    base: BaseModelRef | None = None,
    template_from: Path | None = None,
    health: HealthGate | None = None,
) -> Manifest:
    """The manifest for ``gguf``: runtime profile from the file's own chat template (an adapter's
    comes from its base, ``template_from``), eval scores, the baseline comparison and provenance; the
    rest through the shared builder (quantization checked against the header)."""
    template = chat_template_of(template_from or gguf)
    if not template:
        raise TrainerError(
            Reason.MISSING_CHAT_TEMPLATE,
            f"{gguf.name}: no tokenizer.chat_template; devices could not prompt it",
        )
    eval_entry = {
        "perplexity": scores.perplexity,
        "perplexity_rise_vs_f16": scores.perplexity_rise_vs_f16,
        "metrics": dict(scores.tasks),
    }
    runtime = RuntimeProfile(
        chat_template=template,
        n_ctx=request.n_ctx,
        stop=["<|im_end|>"] if "<|im_end|>" in template else [],
        system_prompt=request.system_prompt,
    )
    spec = ManifestSpec(
        name=request.name,
        serial=request.serial,
        urls=[url],
        runtime=runtime,
        channel=request.channel,
        base_model=request.base_model,
        task=request.task,
        quantization=None if base is not None else request.quant,
        cpu_arch=request.cpu_arch,
        min_ram_mb=request.min_ram_mb,
        device_groups=[request.group] if request.group else [],
        expires_in_days=request.expires_in_days,
        provenance={
            **(request.provenance or {}),
            "eval": {(Quantization.F16 if base else request.quant).value: eval_entry},
            "comparison": comparison.model_dump(mode="json") if comparison else None,
        },
        base=base,
        health=health,
    )
    return build_manifest(gguf, spec)


def _adapter_scores(report: EvalReport, request: PublishRequest) -> tuple[QuantScores, ExportedAdapter]:
    """The adapter's evaluation, as the gate reads scores, and what export recorded of it."""
    lora = report.adapter
    export = read_export_report(request.export_dir)
    exported = export.adapter if export is not None else None
    if lora is None or exported is None or lora.file != exported.file:
        raise TrainerError(Reason.NOT_EVALUATED, "no evaluated adapter (run export --adapter, then eval)")
    scores = QuantScores(
        file=lora.file,
        perplexity=lora.perplexity,
        perplexity_rise_vs_f16=lora.perplexity_rise_vs_f16,
        accepted=lora.perplexity_rise_vs_f16 <= report.max_ppl_rise,
        tasks=lora.tasks,
    )
    return scores, exported


def _passing(
    report: EvalReport, quant: Quantization, gate: GateSettings
) -> tuple[QuantScores, BaselineComparison | None]:
    """``quant``'s scores and baseline comparison, or TrainerError when it may not be published: not
    evaluated, perplexity risen beyond eval's bound, or below the champion/challenger gate."""
    scores = report.quants.get(quant)
    if scores is None:
        raise TrainerError(
            Reason.NOT_EVALUATED, f"{quant.value} was not evaluated (run immune-train eval with it)"
        )
    if not scores.accepted:
        raise TrainerError(
            Reason.EVAL_REFUSED,
            f"{quant.value}: perplexity rise {scores.perplexity_rise_vs_f16:+.1%} vs F16 exceeds "
            f"the bound {report.max_ppl_rise:.1%}; it may not be published",
        )
    return scores, apply_gate(report, quant, gate)


def choose_for_target(
    report: EvalReport, export_dir: Path, target: DeviceTarget, gate: GateSettings
) -> tuple[Quantization, TargetChoice]:
    """The target's fastest evaluated candidate (trainer.targets' cost model, on the tensor types each file
    really holds) that passes ``_passing``, and the record of the choice for the manifest's provenance."""
    costs = {
        quant: target_cost(tensor_elements(find_gguf(export_dir, quant)), target)
        for quant in target.candidates
        if quant in report.quants
    }
    if not costs:
        names = ", ".join(q.value for q in target.candidates)
        raise TrainerError(
            Reason.NOT_EVALUATED,
            f"none of {target.name}'s candidates ({names}) was evaluated "
            f"(immune-train export --target {target.name}, then eval --target {target.name})",
        )
    refused: list[str] = []
    for quant in rank_for_target(costs):
        try:
            _passing(report, quant, gate)
        except TrainerError as error:
            refused.append(f"{quant.value}: {error}")
            continue
        record = TargetChoice(
            name=target.name, chosen=quant, ranked=rank_for_target(costs), cost=costs, refused=refused
        )
        log.info("%s: %s is the fastest candidate that passes (%s)", target.name, quant.value,
                 "; ".join(refused) or "none faster refused")  # fmt: skip
        return quant, record
    raise TrainerError(
        Reason.NO_CANDIDATE, f"no {target.name} candidate may be published: " + "; ".join(refused)
    )


def publish(
    settings: PublishSettings, request: PublishRequest, on_progress: Callable[[int], None] = lambda _: None
) -> PublishedRecord:
    """Upload, sign, verify and publish; returns (and writes to ``published.json``) what was published."""
    report = load_eval(request.export_dir)
    if request.adapter:
        return _publish_adapter(settings, request, report, on_progress)
    target_choice: TargetChoice | None = None
    if request.target is not None:
        quant, target_choice = choose_for_target(report, request.export_dir, get_target(request.target),
                                                 settings.gate)  # fmt: skip
        request = replace(request, quant=quant)
    scores, comparison = _passing(report, request.quant, settings.gate)
    gguf = find_gguf(request.export_dir, request.quant)
    keyring, keys = _signers(settings)  # before any upload: a bad key must not leave stray files
    url = upload(settings.store, gguf, object_path(request.name, request.serial, gguf.name), on_progress)
    stored: dict[str, Any] = {"tensor_types": tensor_types(gguf)}
    if target_choice is not None:
        stored["target"] = target_choice.model_dump(mode="json")
    request = replace(request, provenance={**(request.provenance or {}), **stored})
    manifest = build_publish_manifest(request, gguf, url, scores, comparison, health=settings.health)
    return _sign_and_send(settings, request, manifest, keyring, keys, url)


def _publish_adapter(
    settings: PublishSettings, request: PublishRequest, report: EvalReport, on_progress: Callable[[int], None]
) -> PublishedRecord:
    """The adapter, and its base beside it so that a device lacking the base can fetch it. The
    champion/challenger gate compares merged files only: with a gate set, an adapter is refused."""
    scores, exported = _adapter_scores(report, request)
    if not scores.accepted:
        raise TrainerError(
            Reason.EVAL_REFUSED,
            f"adapter: perplexity rise {scores.perplexity_rise_vs_f16:+.1%} vs the merged F16 exceeds "
            f"the bound {report.max_ppl_rise:.1%}; it may not be published",
        )
    if settings.gate.margins:
        raise TrainerError(
            Reason.NO_BASELINE, "the [gate] compares merged models; adapters have no champion yet"
        )
    keyring, keys = _signers(settings)
    base = Path(exported.base_path)
    # Content-addressed: every adapter of this base points at the same copy.
    base_url = upload(settings.store, base, f"bases/{exported.base_sha256[:16]}/{base.name}", on_progress)
    gguf = request.export_dir / exported.file
    url = upload(settings.store, gguf, object_path(request.name, request.serial, gguf.name), on_progress)
    ref = BaseModelRef(name=base.stem, sha256=exported.base_sha256, size=exported.base_size, urls=[base_url])
    manifest = build_publish_manifest(
        request, gguf, url, scores, None, base=ref, template_from=base, health=settings.health
    )
    return _sign_and_send(settings, request, manifest, keyring, keys, url)


def _signers(settings: PublishSettings) -> tuple[Keyring, list[SigningKey]]:
    if not settings.keyring_file.is_file():
        raise TrainerError(Reason.MISSING_KEYRING, f"{settings.keyring_file}: keyring file not found")
    keyring = Keyring.from_json(settings.keyring_file.read_bytes(), what=str(settings.keyring_file))
    return keyring, trainer_keys(settings, keyring)


def _sign_and_send(
    settings: PublishSettings,
    request: PublishRequest,
    manifest: Manifest,
    keyring: Keyring,
    keys: list[SigningKey],
    url: str,
) -> PublishedRecord:
    envelope = sign_envelope(manifest.to_json(), MANIFEST_PAYLOAD_TYPE, keys)
    verify_manifest(Envelope.from_json(envelope.to_json()), keyring)  # devices must accept what we send

    topics = Topics(settings.fleet, root=settings.mqtt.topic_root)
    topic = topics.desired_group(request.group) if request.group else topics.desired_fleet()
    _publish_retained(settings, topic, envelope.to_json())
    published = PublishedRecord(
        name=manifest.name,
        serial=manifest.serial,
        quantization=manifest.quantization,
        topic=topic,
        url=url,
        size=manifest.model_file.size,
        sha256=manifest.model_file.sha256,
        signed_by=[key.keyid[:12] for key in keys],
        expires_at=manifest.expires_at.isoformat(),
    )
    layout = ExportLayout(request.export_dir)
    published.write(layout.published_file)
    layout.manifest_file(manifest.serial).write_bytes(envelope.to_json())
    log.info("published %s serial %d on %s", manifest.name, manifest.serial, topic)
    return published


def _publish_retained(settings: PublishSettings, topic: str, payload: bytes) -> None:
    client = mqtt_client(settings.mqtt, f"{settings.client_id}-publish")
    try:
        client.connect(settings.mqtt.host, settings.mqtt.port, keepalive=settings.mqtt.keepalive_s)
    except OSError as exc:
        raise TrainerError(
            Reason.BROKER_UNREACHABLE, f"MQTT {settings.mqtt.host}:{settings.mqtt.port}: {exc}"
        ) from exc
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(15)
        if not info.is_published():
            raise TrainerError(
                Reason.PUBLISH_FAILED, f"the broker did not acknowledge the manifest on {topic}"
            )
    finally:
        client.disconnect()
        client.loop_stop()
