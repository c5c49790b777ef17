"""Every reason code the apps report: one closed set, so code compares members and never raw strings.

A code is short, stable and kebab-case; it leads rejection messages (``REJECTED (hash-mismatch): ...``),
deployment events and the audit trail, and tests match on it. ``Reason`` is a ``StrEnum``: a member is
its code wherever a string is expected (JSON, logs, Prometheus labels). The wire schemas keep plain
strings for these fields, so an operator's tools still read a device that knows newer codes.
"""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class Reason(StrEnum):
    """Why an input was refused, an action failed or a deployment ended."""

    # -- signatures and keys:
    # A DSSE envelope, a keyring update or a key file that does not verify or cannot be used.
    BAD_SIGNATURE = "bad-signature"
    BELOW_THRESHOLD = "below-threshold"
    KEY_EXISTS = "key-exists"
    KEY_MALFORMED = "key-malformed"
    KEY_MISSING = "key-missing"
    KEY_PERMISSIONS = "key-permissions"
    KEYRING_VERSION = "keyring-version"
    MALFORMED_BASE64 = "malformed-base64"
    PAYLOAD_TYPE = "payload-type"
    UNKNOWN_KEY = "unknown-key"
    WRONG_ROLE = "wrong-role"

    # -- configuration: A configuration file or a command-line option.
    BAD_OPTION = "bad-option"
    CONFIG_INVALID = "config-invalid"
    CONFIG_MISSING = "config-missing"
    CONFIG_SYNTAX = "config-syntax"
    CONFIG_UNREADABLE = "config-unreadable"

    # -- messages, topics and schemas:
    # An MQTT topic, a message or file that fails its schema, or a capture archive.
    BAD_ARCHIVE = "bad-archive"
    IDENTITY = "identity"
    MISSING_ARCHIVE = "missing-archive"
    SCHEMA = "schema"
    TOO_LARGE = "too-large"
    TOPIC = "topic"

    # -- admission and artifacts:
    # Admission of a manifest and its files (shared/admission.py): device fit, serial floor, sizes,
    # hashes, GGUF headers.
    BAD_GGUF = "bad-gguf"
    BASE_MISMATCH = "base-mismatch"
    EXPIRED = "expired"
    HASH_MISMATCH = "hash-mismatch"
    INCOMPATIBLE_ARCH = "incompatible-arch"
    INSUFFICIENT_RAM = "insufficient-ram"
    KNOWN_BAD = "known-bad"
    MISSING_BASE = "missing-base"
    MISSING_FILE = "missing-file"
    NOT_A_MODEL = "not-a-model"
    NOT_AN_ADAPTER = "not-an-adapter"
    NOT_GGUF = "not-gguf"
    QUANTIZATION_MISMATCH = "quantization-mismatch"
    SERIAL_NOT_NEWER = "serial-not-newer"
    SIZE_MISMATCH = "size-mismatch"
    UNKNOWN_QUANTIZATION = "unknown-quantization"
    WRONG_GROUP = "wrong-group"

    # -- delivery:
    # Fetching an artifact: mirrors that misbehave, and what makes a download worth retrying later.
    DISK_FULL = "disk-full"
    DISK_SPACE = "disk-space"
    DOWNLOAD_FAILED = "download-failed"
    HTTP_STATUS = "http-status"
    IO_ERROR = "io-error"
    MIRRORS_REFUSED = "mirrors-refused"
    TOO_LONG = "too-long"

    # -- serving:
    # activation, gate and trial: Bringing a model up on the device: load, health gate, trial window.
    BAD_TEMPLATE = "bad-template"
    CRASH_LOOP = "crash-loop"
    HEALTH_GATE_EMPTY = "health-gate-empty"
    HEALTH_GATE_RSS = "health-gate-rss"
    HEALTH_GATE_SLOW = "health-gate-slow"
    HEALTH_GATE_WORKER = "health-gate-worker"
    LOAD_FAILED = "load-failed"
    NAME_CLASH = "name-clash"
    NO_BASE = "no-base"
    NO_STORE = "no-store"
    NOT_SERVING = "not-serving"
    SHUTDOWN = "shutdown"
    TRIAL_ERRORS = "trial-errors"
    TRIAL_SLOW = "trial-slow"

    # -- deployments and commands:
    # The device's control plane: deployment results, signed operator commands, the MQTT inbox, the
    # API's credentials.
    CAPTURE_OFF = "capture-off"
    COMMITTED = "committed"
    INBOX_FULL = "inbox-full"
    INTERRUPTED = "interrupted"
    MISSING_TOKEN = "missing-token"  # noqa: S105 (a reason code, not a credential)
    NOT_CACHED = "not-cached"
    NOT_YET_VALID = "not-yet-valid"
    PIN = "pin"
    PINNED = "pinned"
    REJECTED = "rejected"
    REPLAYED = "replayed"
    ROLLBACK = "rollback"
    SERIAL_REUSED = "serial-reused"
    STATE_CORRUPT = "state-corrupt"
    STORE_CHANGED = "store-changed"
    STORE_CORRUPT = "store-corrupt"
    USAGE = "usage"
    WRONG_DEVICE = "wrong-device"
    WRONG_TOKEN = "wrong-token"  # noqa: S105 (a reason code, not a credential)
    WRONG_TOPIC = "wrong-topic"

    # -- the fleet operator: ``immune-fleet``: the broker, devices, rollouts and the Pi wheelhouse.
    BROKER_UNREACHABLE = "broker-unreachable"
    EXISTS = "exists"
    NO_DEVICES = "no-devices"
    NO_RESPONSE = "no-response"
    ROLLOUT_HALTED = "rollout-halted"
    ROLLOUT_MISMATCH = "rollout-mismatch"
    WHEELHOUSE = "wheelhouse"
    WHEELHOUSE_BUILD = "wheelhouse-build"

    # -- the trainer:
    # ``immune-train``: datasets, base models, training, export, evaluation, the gate and publishing.
    ADAPTER_NEEDS_GGUF_BASE = "adapter-needs-gguf-base"
    BAD_ANSWER_PARTS = "bad-answer-parts"
    BAD_BASE_MODEL = "bad-base-model"
    BAD_BASELINE = "bad-baseline"
    BAD_EVAL = "bad-eval"
    BAD_EXPORT = "bad-export"
    BAD_INPUT = "bad-input"
    BAD_QUANT = "bad-quant"
    BAD_RECORD = "bad-record"
    BAD_RUN = "bad-run"
    BAD_STATS = "bad-stats"
    BAD_TARGET = "bad-target"
    BAD_TOKENIZER = "bad-tokenizer"
    BROKEN_CONVERSION = "broken-conversion"
    CHAMPION_BETTER = "champion-better"
    CONTEXT_TOO_SMALL = "context-too-small"
    EMPTY_DATASET = "empty-dataset"
    EMPTY_GGUF = "empty-gguf"
    EVAL_REFUSED = "eval-refused"
    EXPORT_FAILED = "export-failed"
    IMATRIX_FAILED = "imatrix-failed"
    MISSING_ADAPTER = "missing-adapter"
    MISSING_BASE_MODEL = "missing-base-model"
    MISSING_CHAT_TEMPLATE = "missing-chat-template"
    MISSING_DATA = "missing-data"
    MISSING_EVAL = "missing-eval"
    MISSING_EXPORT = "missing-export"
    MISSING_GGUF = "missing-gguf"
    MISSING_KEY = "missing-key"
    MISSING_KEYRING = "missing-keyring"
    MISSING_RUN = "missing-run"
    NO_BASELINE = "no-baseline"
    NO_CANDIDATE = "no-candidate"
    NO_CHECKPOINT = "no-checkpoint"
    NO_TEACHER_ANSWERS = "no-teacher-answers"
    NOT_EVALUATED = "not-evaluated"
    PUBLISH_FAILED = "publish-failed"
    TEACHER_MODEL_UNKNOWN = "teacher-model-unknown"
    TEACHER_UNAUTHORIZED = "teacher-unauthorized"
    TEACHER_UNREACHABLE = "teacher-unreachable"
    THRESHOLD = "threshold"
    TOKENIZER_MISMATCH = "tokenizer-mismatch"
    TOOLCHAIN = "toolchain"
    UNDISTILLED_CAPTURE = "undistilled-capture"
    UNKNOWN_PROFILE = "unknown-profile"
    UNSUPPORTED_ARCHITECTURE = "unsupported-architecture"
    UPLOAD_FAILED = "upload-failed"
    WRONG_QUANT = "wrong-quant"
