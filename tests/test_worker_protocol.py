"""The pipe protocol between the daemon and a real llama-cpp-python worker: every message is told
apart by its ``type`` tag, never by what its text happens to contain."""

from __future__ import annotations

import pytest

from edge.runtime.handle import WorkerHandle
from edge.runtime.protocol import WORKER_COMMAND, Cancel, ChatMessage, GenerateRequest, LoadSpec, SetThreads

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker(smollm2_model):
    handle = WorkerHandle(LoadSpec(model_path=str(smollm2_model), n_ctx=512, n_threads=1), "smol").start()
    yield handle
    handle.stop()


def _run(worker: WorkerHandle, request: GenerateRequest) -> list:
    return list(worker.generate(request))


def test_a_chat_saying_cancel_is_a_generation(worker):
    """Bug: the worker searched the raw bytes for '"cancel"' and took this for a cancel message."""
    request = GenerateRequest(
        id="chat-1", messages=[ChatMessage(role="user", content="cancel")], max_tokens=4, temperature=0
    )
    events = _run(worker, request)
    assert events[-1].type == "done" and events[-1].id == "chat-1"
    assert events[-1].finish_reason in ("stop", "length")


def test_a_stop_string_named_cancel_or_set_threads_is_a_generation(worker):
    request = GenerateRequest(
        id="chat-2", prompt="Say hello.", max_tokens=4, stop=["cancel", "set_threads"], temperature=0
    )
    events = _run(worker, request)
    assert events[-1].type == "done" and events[-1].id == "chat-2"


def test_each_message_kind_round_trips_through_the_tagged_union():
    for message in (
        GenerateRequest(id="x", prompt="cancel set_threads", max_tokens=1),
        Cancel(id="x"),
        SetThreads(n_threads=1, n_threads_batch=2),
    ):
        assert WORKER_COMMAND.validate_json(message.model_dump_json()) == message


def test_a_message_without_a_type_is_refused():
    with pytest.raises(ValueError, match="type"):
        WORKER_COMMAND.validate_json(b'{"cancel": "x"}')


def test_a_request_sent_as_the_worker_dies_is_a_worker_error(smollm2_model, monkeypatch):
    """Bug (seen in test_edge_serving under load): a worker killed between the liveness check and the
    send raised BrokenPipeError out of generate(), a 500 instead of a retry on the restarted worker.
    The window is held open by reporting the dead process alive at the check."""
    from edge.runtime.handle import WorkerError

    handle = WorkerHandle(LoadSpec(model_path=str(smollm2_model), n_ctx=512, n_threads=1), "doomed").start()
    try:
        handle._process.kill()
        handle._process.join(10)
        request = GenerateRequest(
            id="late", messages=[ChatMessage(role="user", content="hello")], max_tokens=2, temperature=0
        )
        with monkeypatch.context() as race:
            race.setattr(WorkerHandle, "alive", property(lambda self: True))
            with pytest.raises(WorkerError, match="worker doomed is gone"):
                _run(handle, request)
            with pytest.raises(WorkerError, match="worker doomed is gone"):
                handle.set_threads(1, 1)
        assert not handle.alive
    finally:
        handle.stop()


def test_a_worker_killed_before_reading_its_request_is_a_worker_error(smollm2_model):
    """Bug (CI, test_crashed_worker_is_restarted_and_requests_survive): a worker killed with bytes it had
    not read yet resets its end of the pipe, and the daemon's read raised ConnectionResetError out of
    generate(): a 500 instead of a retry on the restarted worker. The worker is held stopped so that the
    request stays unread, then killed."""
    import os
    import signal
    import threading

    from edge.runtime.handle import WorkerError

    handle = WorkerHandle(LoadSpec(model_path=str(smollm2_model), n_ctx=512, n_threads=1), "reset").start()
    try:
        pid = handle.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        kill = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
        kill.start()
        request = GenerateRequest(
            id="unread", messages=[ChatMessage(role="user", content="hello")], max_tokens=2, temperature=0
        )
        try:
            # "exited" only if the kill lands between a poll and the liveness check: either is a WorkerError.
            with pytest.raises(WorkerError, match="worker reset (is gone|exited)"):
                _run(handle, request)
        finally:
            kill.join()
        assert not handle.alive
    finally:
        handle.stop()


def test_a_prompt_slower_than_the_token_timeout_is_bounded_by_the_request_deadline(worker, monkeypatch):
    """Bug (the emulated arm64 check: `worker_failed` on a Slips prompt): the wait for the first event, which
    comes only once the whole prompt is evaluated, was cut at the between-token silence limit (120 s), so a
    long prompt on a Pi failed as a hung worker well inside the request's own timeout. The worker is held
    stopped past a shortened silence limit before it can read the request; the request's deadline is far."""
    import os
    import signal
    import threading
    import time

    from edge.runtime import handle as handle_module

    monkeypatch.setattr(handle_module, "TOKEN_TIMEOUT_S", 0.5)
    request = GenerateRequest(
        id="slow-prompt", messages=[ChatMessage(role="user", content="hello")], max_tokens=2, temperature=0
    )
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(2.0, os.kill, (pid, signal.SIGCONT))
    resume.start()
    try:
        events = list(worker.generate(request, deadline=time.monotonic() + 120))
    finally:
        resume.join()
    assert events[-1].type == "done"


def test_threads_are_measured_at_load_within_what_the_process_may_use(smollm2_model):
    """No thread counts configured: the worker measures them at load, among the counts the CPUs it may
    run on allow (one CPU: one thread), keeping a configured prompt-thread count as given."""
    import os

    allowed = os.sched_getaffinity(0)
    handles = []
    try:
        os.sched_setaffinity(0, {min(allowed)})  # the spawned worker inherits it
        one = WorkerHandle(LoadSpec(model_path=str(smollm2_model), n_ctx=512), "one-cpu").start()
        handles.append(one)
        os.sched_setaffinity(0, allowed)
        spec = LoadSpec(model_path=str(smollm2_model), n_ctx=512, n_threads_batch=1)
        every = WorkerHandle(spec, "every-cpu").start()
        handles.append(every)
    finally:
        os.sched_setaffinity(0, allowed)
        for handle in handles:
            handle.stop()
    assert (one.n_threads, one.n_threads_batch) == (1, 1)
    assert 1 <= every.n_threads <= len(allowed) and every.n_threads_batch == 1
    assert one.tuned_threads == (1, 1)


def test_a_model_that_answers_nothing_fails_its_gate_as_empty(smollm2_model, worker):
    """`health-gate-empty`: the model's own stop sequences (every printable character) end each golden
    answer before its first character, so the model loads and answers, with no text. The same prompt
    passes the gate on a worker without them, so the refusal is the empty answer, not the prompt."""
    import string

    from edge.runtime.health import GateCriteria, GateError, run_health_gate
    from shared.reasons import Reason

    criteria = GateCriteria(golden_prompts=("Say hello.",), max_tokens=8)
    assert run_health_gate(worker, criteria, None).answers[0].strip()
    spec = LoadSpec(model_path=str(smollm2_model), n_ctx=512, n_threads=1, stop=list(string.printable))
    mute = WorkerHandle(spec, "mute").start()
    try:
        with pytest.raises(GateError, match="produced no text") as refused:
            run_health_gate(mute, criteria, None)
    finally:
        mute.stop()
    assert refused.value.reason is Reason.HEALTH_GATE_EMPTY


def test_a_worker_that_dies_fails_its_gate_as_a_worker_fault(smollm2_model):
    """`health-gate-worker`: the worker process is killed after loading; the gate names the worker,
    not the model's answers or speed."""
    from edge.runtime.health import GateCriteria, GateError, run_health_gate
    from shared.reasons import Reason

    handle = WorkerHandle(LoadSpec(model_path=str(smollm2_model), n_ctx=512, n_threads=1), "killed").start()
    try:
        handle._process.kill()
        handle._process.join(10)
        with pytest.raises(GateError, match="the worker failed during the health gate") as refused:
            run_health_gate(handle, GateCriteria(golden_prompts=("Say hello.",)), None)
    finally:
        handle.stop()
    assert refused.value.reason is Reason.HEALTH_GATE_WORKER
