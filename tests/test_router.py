"""The router's bookkeeping on its own: names, the bounded queue, holding during a swap, draining."""

from __future__ import annotations

import threading
import time

import pytest

from edge.runtime.router import ModelRouter, NoModelError, QueueFullError, ServedModel, UnknownModelError


def served(name: str, aliases: tuple[str, ...] = ("slips",)) -> ServedModel:
    # The router never touches the worker; routing logic is tested without a model process.
    return ServedModel(name, worker=None, n_ctx=512, max_tokens_cap=64, created=0, aliases=aliases)  # type: ignore[arg-type]


def test_names_aliases_and_unknown_models() -> None:
    router = ModelRouter()
    with pytest.raises(NoModelError, match="no model is loaded"):
        router.checkout("", 0.1)
    router.serve(served("smol"))
    assert router.checkout("slips", 0.1).name == "smol"
    assert router.checkout("", 0.1).name == "smol"
    with pytest.raises(UnknownModelError, match=r"'gpt-4' is not served here \(available: smol, slips\)"):
        router.checkout("gpt-4", 0.1)


def test_queue_bound() -> None:
    router = ModelRouter(max_waiting=1)
    router.admit()
    router.admit()
    with pytest.raises(QueueFullError):
        router.admit()
    router.release()
    router.admit()


def test_hold_makes_requests_wait_for_the_next_model() -> None:
    router = ModelRouter()
    old = served("smol")
    router.serve(old)
    assert router.hold() is old
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(router.checkout("slips", 10).name))
    waiter.start()
    time.sleep(0.2)
    assert got == []  # still waiting, not failed
    router.serve(served("gemma"))
    waiter.join(5)
    assert got == ["gemma"]
    router.hold()
    with pytest.raises(NoModelError, match="swap is still in progress"):
        router.checkout("slips", 0.2)


def test_drain_waits_for_requests_on_the_old_model() -> None:
    router = ModelRouter()
    router.serve(served("smol"))
    model = router.checkout("slips", 0.1)
    router.serve(served("gemma"))
    assert not router.drain(model, 0.1)
    threading.Timer(0.2, router.checkin, args=(model,)).start()
    assert router.drain(model, 5)
    assert model.inflight == 0
