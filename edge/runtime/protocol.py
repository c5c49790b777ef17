"""Messages between the daemon and an inference worker process (JSON over a multiprocessing pipe).

The worker is a separate process so a crash or hang in native code cannot take the control plane
down; these models are the whole interface, validated on both sides. Every message carries a
``type`` tag, so the receiver decides what a message is from that field alone (never from its text:
a chat whose content is "cancel" is still a generation request).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoadSpec(_Message):
    """How to load one GGUF (from the signed manifest's runtime profile, or `serve` options)."""

    model_path: str
    n_ctx: Annotated[int, Field(ge=128, le=131072)] = 4096
    #: Threads for generating tokens and for prompt batches; None: measured at load (see worker).
    n_threads: Annotated[int, Field(ge=1, le=256)] | None = None
    n_threads_batch: Annotated[int, Field(ge=1, le=256)] | None = None
    n_batch: Annotated[int, Field(ge=1, le=8192)] = 512
    chat_format: str | None = None
    chat_template: str | None = None
    stop: list[str] = []
    #: Reuse the KV state of the prefix shared with the previous prompt (Slips' system prompt and
    #: instructions, a retried prompt).
    prefix_reuse: bool = True
    #: Also keep the states of older prompts in RAM (llama-cpp-python's LlamaRAMCache). Off by
    #: default: saving each state costs ~5 % TTFT and ~100 MB per 4k-token context; it brings an
    #: alert asked about again after others back in under a second (docs/benchmarks.md).
    prompt_cache_mb: Annotated[int, Field(ge=0)] = 0
    #: LoRA adapters to load with the base, by the name requests select them with.
    adapters: dict[str, str] = {}


class ChatMessage(_Message):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class JsonOutput(_Message):
    """Constrain the answer to JSON: the worker turns the schema into a llama.cpp grammar, so every
    token sampled keeps the text valid. The schema was checked by the API (edge.api.structured)."""

    #: None: any JSON object.
    json_schema: dict[str, Any] | None = None


class GenerateRequest(_Message):
    """One generation; exactly one of ``messages`` (chat) and ``prompt`` (raw completion).

    ``stop`` holds the client's stop sequences, matched by the worker so it can say which one ended
    the answer; the model's own end-of-turn strings come from its LoadSpec."""

    type: Literal["generate"] = "generate"
    id: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    max_tokens: Annotated[int, Field(ge=1)]
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    stop: list[str] = []
    seed: int | None = None
    json_output: JsonOutput | None = None
    #: The loaded LoRA adapter to apply (None: the base alone).
    adapter: str | None = None


class CountTokens(_Message):
    """How many tokens ``messages`` take once the chat template is applied (no generation)."""

    type: Literal["count_tokens"] = "count_tokens"
    id: str
    messages: list[ChatMessage]


class LoadAdapter(_Message):
    """Load a LoRA adapter beside the base (between requests; the base stays loaded). The worker
    answers ``ready`` listing its adapters, or ``error``."""

    type: Literal["load_adapter"] = "load_adapter"
    name: Annotated[str, Field(min_length=1)]
    path: str


class DropAdapter(_Message):
    """Unload an adapter; answered like LoadAdapter."""

    type: Literal["drop_adapter"] = "drop_adapter"
    name: str


class Cancel(_Message):
    """Stop the running generation (the client went away)."""

    type: Literal["cancel"] = "cancel"
    id: str


class SetThreads(_Message):
    """Change the thread counts of the loaded model between requests (thermal back-off); the worker
    answers with a ``ready`` event carrying the counts now in use."""

    type: Literal["set_threads"] = "set_threads"
    n_threads: Annotated[int, Field(ge=1, le=256)]
    n_threads_batch: Annotated[int, Field(ge=1, le=256)]


#: What the daemon sends a worker, told apart by ``type``.
_Commands = GenerateRequest | CountTokens | LoadAdapter | DropAdapter | Cancel | SetThreads
WorkerCommand = Annotated[_Commands, Field(discriminator="type")]
WORKER_COMMAND: TypeAdapter[_Commands] = TypeAdapter(WorkerCommand)


class WorkerEvent(_Message):
    """What a worker sends back: ready once, then deltas and one done (or error) per generation, one
    count per CountTokens. The first delta already carries ``prompt_tokens``."""

    type: Literal["ready", "delta", "done", "count", "error"]
    id: str = ""
    text: str = ""
    finish_reason: str | None = None
    #: The client stop sequence that ended the answer (``finish_reason`` is then "stop").
    stop_sequence: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    total_ms: float = 0.0
    n_threads: int = 0
    n_threads_batch: int = 0
    #: RAM the loaded model's prompt cache may hold (``ready`` only; 0: none), as the worker set it up.
    prompt_cache_bytes: int = 0
    #: What the GGUF says it is (``ready`` only): its architecture and parameter count.
    architecture: str = ""
    parameters: int = 0
    #: The adapters loaded (``ready`` only).
    adapters: list[str] = []
    error: str | None = None
    #: Set when the request itself was at fault (the API answers 400): "context_length_exceeded",
    #: "json_schema_unusable".
    error_code: str | None = None
