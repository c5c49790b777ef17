"""``immune-fleet``: the operator's tool. Built only on the shared contracts (never on edge or trainer)."""
