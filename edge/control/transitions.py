"""Every state a deployment row can be in, per kind of change, in one table: where it may go next
and what a restart does to it when it is stopped there (as Mender's client keeps its states).

A new model or adapter version (``model``, ``adapter``):
    queued -> downloading -> verifying -> staged -> activating -> trial -> committed
An operator change to a cached version (``rollback``, ``pin``):
    queued -> verifying -> activating -> rolled_back (rollback) | committed (pin)
Any state may also end in ``failed``; a new version also in ``rejected`` (bad input) and
``rolled_back`` (its trial failed).

On a restart (a Pi loses power), a new version stopped before it went live is simply run again
from its signed envelope (downloads continue from their partial files). One stopped while
activating or on trial is retried like a boot counter retries a new slot (RAUC, SWUpdate,
U-Boot's bootcount): the previous model serves again, then the new one is activated and tried once
more, up to ``deploy.activation_retries`` times; after that the serial is marked bad. An operator
change is switched again to its target (re-checked from the store), never through admission: its
target is below the serial floor by design, and it never gets a trial or a bad mark.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from edge.state.ledger import ChangeKind
from shared.messages import DeploymentState

Q, D, V, S, A, T = (
    DeploymentState.QUEUED,
    DeploymentState.DOWNLOADING,
    DeploymentState.VERIFYING,
    DeploymentState.STAGED,
    DeploymentState.ACTIVATING,
    DeploymentState.TRIAL,
)
COMMITTED, ROLLED_BACK = DeploymentState.COMMITTED, DeploymentState.ROLLED_BACK
REJECTED, FAILED = DeploymentState.REJECTED, DeploymentState.FAILED


class Resume(StrEnum):
    """How a deployment stopped in a state continues after a restart."""

    #: Run it again from its signed envelope: admission again, downloads resumed by Range.
    REDO = "redo"
    #: Serve the previous model, then activate and try the new one again (bounded by a counter).
    RETRY_ACTIVATION = "retry-activation"
    #: Switch to the operator's target again: its blobs re-checked, then the same go-live.
    SWITCH_AGAIN = "switch-again"


@dataclass(frozen=True)
class Row:
    """One (kind, state): the states it may go to and how a restart resumes it."""

    then: frozenset[DeploymentState]
    on_restart: Resume


def _rows(
    path: tuple[DeploymentState, ...], ends: set[DeploymentState], resume: dict[DeploymentState, Resume]
) -> dict[DeploymentState, Row]:
    """The rows of one forward ``path``: each state goes to a later one or to an end."""
    return {
        state: Row(frozenset(path[index + 1 :]) | frozenset(ends), resume[state])
        for index, state in enumerate(path)
    }


#: The longest forward path (a new version's); every kind's path is a subsequence of it.
NEW_VERSION_PATH = (Q, D, V, S, A, T)

_REDO, _RETRY, _SWITCH = Resume.REDO, Resume.RETRY_ACTIVATION, Resume.SWITCH_AGAIN
_NEW = _rows(
    NEW_VERSION_PATH,
    {COMMITTED, REJECTED, FAILED, ROLLED_BACK},
    {Q: _REDO, D: _REDO, V: _REDO, S: _REDO, A: _RETRY, T: _RETRY},
)
_ROLLBACK = _rows((Q, V, A), {ROLLED_BACK, FAILED}, {Q: _SWITCH, V: _SWITCH, A: _SWITCH})
_PIN = _rows((Q, V, A), {COMMITTED, FAILED}, {Q: _SWITCH, V: _SWITCH, A: _SWITCH})

#: (kind, state) -> where it may go and what a restart does there. Terminal states have no row.
TABLE: dict[tuple[ChangeKind, DeploymentState], Row] = {
    (kind, state): row
    for kind, rows in (
        (ChangeKind.MODEL, _NEW),
        (ChangeKind.ADAPTER, _NEW),
        (ChangeKind.ROLLBACK, _ROLLBACK),
        (ChangeKind.PIN, _PIN),
    )
    for state, row in rows.items()
}


class TransitionError(RuntimeError):
    """A programming error: the code tried a move the table does not have."""


def check_transition(kind: ChangeKind, reached: DeploymentState, state: DeploymentState) -> None:
    """Raise unless a ``kind`` row in ``reached`` may go to ``state``."""
    row = TABLE.get((kind, reached))
    if row is None or state not in row.then:
        raise TransitionError(f"a {kind.value} deployment cannot go from {reached.value} to {state.value}")


def on_restart(kind: ChangeKind, state: DeploymentState) -> Resume:
    """What a restart does to a ``kind`` deployment stopped in ``state``."""
    return TABLE[(kind, state)].on_restart
