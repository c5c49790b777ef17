"""The Raspberry Pi firmware's throttling word (``vcgencmd get_throttled``), decoded into named flags;
devices report them and operators read them, so the meaning lives in the shared contract."""

from __future__ import annotations

#: Bit of each condition "now"; bit + SINCE_BOOT_SHIFT is the same condition "since boot".
THROTTLE_BITS: dict[str, int] = {
    "under_voltage": 0,
    "freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
}
SINCE_BOOT_SHIFT = 16


def decode_throttled(bits: int) -> dict[str, bool]:
    """Named flags of a get_throttled word: ``<flag>_now`` and ``<flag>_since_boot``."""
    flags: dict[str, bool] = {}
    for name, bit in THROTTLE_BITS.items():
        flags[f"{name}_now"] = bool(bits >> bit & 1)
        flags[f"{name}_since_boot"] = bool(bits >> (bit + SINCE_BOOT_SHIFT) & 1)
    return flags


def active_flags(bits: int | None) -> list[str]:
    """The flags that are set, for display (``throttled_now``, ``under_voltage_since_boot``...)."""
    return [] if bits is None else [name for name, on in decode_throttled(bits).items() if on]
