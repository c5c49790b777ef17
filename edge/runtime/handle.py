"""The daemon's side of one inference worker process: start it, send requests, stream events back,
cancel on client disconnect, notice crashes."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

from edge.runtime.protocol import (
    Cancel,
    ChatMessage,
    CountTokens,
    DropAdapter,
    GenerateRequest,
    LoadAdapter,
    LoadSpec,
    SetThreads,
    WorkerEvent,
)
from edge.runtime.worker import worker_main

log = logging.getLogger(__name__)

#: Worst case for one token on a throttled Pi; a worker silent for longer between tokens is treated as hung.
TOKEN_TIMEOUT_S = 120.0
#: How long a worker whose pipe broke gets to finish exiting (a killed process is gone in milliseconds).
PIPE_BROKEN_EXIT_WAIT_S = 2.0


class WorkerError(RuntimeError):
    """The worker failed to load, crashed, hung or reported an error."""


class RequestTimeoutError(WorkerError):
    """The request's deadline passed while it waited for, or ran on, the worker (it was cancelled)."""


class RequestRejectedError(WorkerError):
    """The worker refused the request itself (it stays healthy); ``code`` says why."""

    def __init__(self, code: str, message: str, prompt_tokens: int = 0) -> None:
        super().__init__(message)
        self.code = code
        #: The prompt's size when that is why it was refused (0: not known).
        self.prompt_tokens = prompt_tokens


def _failure(event: WorkerEvent) -> WorkerError:
    message = event.error or "worker error"
    if event.error_code:
        return RequestRejectedError(event.error_code, message, event.prompt_tokens)
    return WorkerError(message)


class WorkerHandle:
    """One llama-cpp-python process serving one model, one request at a time."""

    def __init__(self, spec: LoadSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self.n_threads = 0
        self.n_threads_batch = 0
        #: The counts chosen at load (measured or configured), restored when a thermal limit ends.
        self.tuned_threads = (0, 0)
        self.load_ms = 0.0
        #: The prompt cache the worker reports having set up.
        self.prompt_cache_bytes = 0
        #: What the loaded GGUF says it is.
        self.architecture = ""
        self.parameters = 0
        #: The LoRA adapters loaded now (name -> path); a restarted worker loads them again.
        self.adapters: dict[str, str] = dict(spec.adapters)
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None

    def start(self, timeout_s: float = 300.0) -> WorkerHandle:
        """Start the process and wait until the model is loaded; raise WorkerError otherwise."""
        # spawn, not fork: the daemon has threads (MQTT, HTTP) that a fork would copy half-way.
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        started = time.perf_counter()
        process = context.Process(
            target=worker_main,
            args=(child, self.spec.model_dump_json()),
            name=f"worker-{self.name}",
            daemon=True,
        )
        process.start()
        child.close()
        self._conn, self._process = parent, process
        event = self._receive(timeout_s, "loading")
        if event.type != "ready":
            self.stop()
            raise WorkerError(event.error or f"worker for {self.name} did not start")
        self.n_threads, self.n_threads_batch = event.n_threads, event.n_threads_batch
        self.tuned_threads = (event.n_threads, event.n_threads_batch)
        self.prompt_cache_bytes = event.prompt_cache_bytes
        self.architecture, self.parameters = event.architecture, event.parameters
        self.load_ms = (time.perf_counter() - started) * 1000
        log.info(
            "worker %s ready (pid %s, %d/%d threads for tokens/prompts, %.0f ms)",
            self.name,
            process.pid,
            self.n_threads,
            self.n_threads_batch,
            self.load_ms,
        )
        return self

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _receive(self, timeout_s: float, doing: str, deadline_bound: bool = False) -> WorkerEvent:
        conn = self._conn
        if conn is None:
            raise WorkerError(f"worker {self.name} is not running")
        deadline = time.monotonic() + timeout_s
        while not conn.poll(0.2):
            if not self.alive:
                code = self._process.exitcode if self._process else None
                raise WorkerError(f"worker {self.name} exited (code {code}) while {doing}")
            if time.monotonic() > deadline:
                if deadline_bound:
                    raise RequestTimeoutError(f"request timed out on worker {self.name}")
                raise WorkerError(f"worker {self.name} silent for {timeout_s:.0f} s while {doing}")
        try:
            return WorkerEvent.model_validate_json(conn.recv_bytes())
        except EOFError:
            raise WorkerError(f"worker {self.name} closed its pipe while {doing}") from None
        except OSError as exc:  # killed with bytes it had not read: its end of the pipe was reset
            raise self._gone(exc) from None

    def generate(self, request: GenerateRequest, deadline: float | None = None) -> Iterator[WorkerEvent]:
        """Yield delta events then one done event; raise WorkerError on failure and
        RequestTimeoutError once ``deadline`` (time.monotonic) passes. Closing the iterator early
        cancels the generation in the worker."""
        wait_s = -1.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self._lock.acquire(timeout=wait_s):
            raise RequestTimeoutError(f"request timed out waiting for worker {self.name}")
        try:
            self._send(request.model_dump_json().encode())
            finished = False
            # The first event comes only once the whole prompt is evaluated, which on a Pi can take longer
            # than any one token: only the request's deadline bounds it. Between tokens, silence means hung.
            first = True
            try:
                while True:
                    remaining = TOKEN_TIMEOUT_S if deadline is None else deadline - time.monotonic()
                    if remaining <= 0:
                        raise RequestTimeoutError(f"request timed out on worker {self.name}")
                    if first and deadline is not None:
                        wait_s, by_deadline = remaining, True
                    else:
                        wait_s, by_deadline = min(remaining, TOKEN_TIMEOUT_S), remaining < TOKEN_TIMEOUT_S
                    event = self._receive(wait_s, "generating", by_deadline)
                    first = False
                    if event.type == "error":
                        finished = True
                        raise _failure(event)
                    if event.type == "done":
                        finished = True
                        yield event
                        return
                    yield event
            finally:
                if not finished and self.alive:
                    self._cancel(request.id)
        finally:
            self._lock.release()

    def _send(self, payload: bytes) -> None:
        """Send one message (the lock held); WorkerError when the worker is not running, also when it
        dies between the liveness check and the send (the pipe breaks)."""
        if self._conn is None or not self.alive:
            raise WorkerError(f"worker {self.name} is not running")
        try:
            self._conn.send_bytes(payload)
        except OSError as exc:
            raise self._gone(exc) from None

    def _gone(self, broken: OSError) -> WorkerError:
        """The error for a pipe that broke because the worker died. Waiting for its exit first lets
        the caller see it dead and retry on the replacement."""
        if self._process is not None:
            self._process.join(PIPE_BROKEN_EXIT_WAIT_S)
        return WorkerError(f"worker {self.name} is gone ({broken})")

    def count_tokens(self, messages: list[ChatMessage], deadline: float) -> int:
        """Tokens ``messages`` take through the model's chat template (waits for the worker to be
        free; RequestTimeoutError once ``deadline`` passes)."""
        wait_s = max(deadline - time.monotonic(), 0.0)
        busy = RequestTimeoutError(f"request timed out waiting for worker {self.name}")
        event = self._exchange(CountTokens(id="count", messages=messages), wait_s, busy, "counting tokens")
        return event.prompt_tokens

    def _exchange(
        self,
        command: CountTokens | LoadAdapter | DropAdapter | SetThreads,
        wait_s: float,
        busy: WorkerError,
        doing: str,
    ) -> WorkerEvent:
        """Send one command between requests and return its one reply; ``busy`` is raised when the
        worker stays taken for ``wait_s``, an ``error`` reply as its WorkerError."""
        if not self._lock.acquire(timeout=wait_s):
            raise busy
        try:
            self._send(command.model_dump_json().encode())
            event = self._receive(TOKEN_TIMEOUT_S, doing)
            if event.type == "error":
                raise _failure(event)
            return event
        finally:
            self._lock.release()

    def load_adapter(self, name: str, path: str, timeout_s: float = TOKEN_TIMEOUT_S) -> None:
        """Load (or replace) adapter ``name`` once the running request is done; the base stays."""
        self._adapter_command(LoadAdapter(name=name, path=path), timeout_s)
        self.adapters[name] = path

    def drop_adapter(self, name: str, timeout_s: float = TOKEN_TIMEOUT_S) -> None:
        """Unload adapter ``name`` once the running request is done."""
        self._adapter_command(DropAdapter(name=name), timeout_s)
        self.adapters.pop(name, None)

    def restart_spec(self) -> LoadSpec:
        """What a replacement process must load: the base and the adapters loaded now."""
        return self.spec.model_copy(update={"adapters": dict(self.adapters)})

    def _adapter_command(self, command: LoadAdapter | DropAdapter, timeout_s: float) -> None:
        busy = WorkerError(f"worker {self.name} stayed busy for {timeout_s:.0f} s")
        self._exchange(command, timeout_s, busy, f"{command.type} {command.name}")

    def set_threads(self, n_threads: int, n_threads_batch: int, timeout_s: float = TOKEN_TIMEOUT_S) -> None:
        """Change the thread counts once the running request (if any) is done; WorkerError on failure."""
        busy = WorkerError(f"worker {self.name} stayed busy for {timeout_s:.0f} s")
        change = SetThreads(n_threads=n_threads, n_threads_batch=n_threads_batch)
        event = self._exchange(change, timeout_s, busy, "changing threads")
        self.n_threads, self.n_threads_batch = event.n_threads, event.n_threads_batch

    def _cancel(self, request_id: str) -> None:
        """Stop a generation whose consumer went away and wait for the worker to be idle again."""
        if self._conn is None:
            return
        try:
            self._conn.send_bytes(Cancel(id=request_id).model_dump_json().encode())
        except OSError as exc:  # the worker died between the liveness check and the send
            log.warning("cancel of %s: worker %s is gone (%s)", request_id, self.name, exc)
            return
        try:
            while self._receive(TOKEN_TIMEOUT_S, "cancelling").type not in ("done", "error"):
                pass
        except WorkerError as exc:
            log.warning("cancel of %s: %s", request_id, exc)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the pipe (the worker exits) and make sure the process is gone."""
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn = None
