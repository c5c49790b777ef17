"""Address redaction before a captured exchange is stored: every IPv4, IPv6 and MAC address of the
chosen kinds is replaced by a placeholder of the same kind, the same one for the same address for as
long as the capture store lives, so the text stays learnable (a scan from one host to many still
reads as one host and many targets) while the customer's addresses never reach the disk.

Placeholders come from ranges that mean "not a real host": private IPv4 addresses from 10.0.0.0/8,
other IPv4 addresses from 198.18.0.0/15 (set aside for benchmarks), IPv6 from 2001:db8::/32
(documentation) and MACs as locally administered 02:00:00:xx:xx:xx. The map keeps only a keyed
digest of each original (HMAC-SHA256 with the store's secret), never the address itself."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Sequence

from edge.capture.store import CaptureStore
from shared.capture import CapturedExchange, RedactionKind

_MAC = re.compile(
    r"(?<![0-9A-Fa-f:-])[0-9A-Fa-f]{2}(?:([:-])[0-9A-Fa-f]{2})(?:\1[0-9A-Fa-f]{2}){4}(?![0-9A-Fa-f:-])"
)
#: Candidates only: each is checked by the ipaddress module (times such as 10:00:00 are not addresses).
_IPV6 = re.compile(
    r"(?<![0-9A-Fa-f:.])(?=[0-9A-Fa-f:.]*:[0-9A-Fa-f.]*:)[0-9A-Fa-f:.]{1,44}[0-9A-Fa-f:](?![0-9A-Fa-f:]|\.\d)"
)
#: A sentence may end right after an address ("... from 10.0.0.5."): only a digit or ".digit" extends it.
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")


def _ipv4(base: str) -> Callable[[int], str]:
    start = int(ipaddress.IPv4Address(base))
    return lambda n: str(ipaddress.IPv4Address(start + n))


def _ipv6(n: int) -> str:
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8::")) + n))


def _mac(n: int) -> str:
    return "02:00:00:" + ":".join(f"{(n >> shift) & 0xFF:02x}" for shift in (16, 8, 0))


_PRIVATE_V4, _PUBLIC_V4 = _ipv4("10.0.0.0"), _ipv4("198.18.0.0")


class Redactor:
    """Replaces the configured address kinds, the map kept in ``store``."""

    def __init__(self, kinds: Sequence[RedactionKind], store: CaptureStore) -> None:
        self.kinds = tuple(kinds)
        self._store = store

    def _placeholder(self, kind: str, original: str, make: Callable[[int], str]) -> str:
        digest = hmac.new(self._store.secret, f"{kind}:{original}".encode(), hashlib.sha256).hexdigest()
        return self._store.placeholder(kind, digest, make)

    def _mac(self, match: re.Match[str]) -> str:
        return self._placeholder("mac", match[0].lower().replace("-", ":"), _mac)

    def _v6(self, match: re.Match[str]) -> str:
        try:
            address = ipaddress.IPv6Address(match[0])
        except ValueError:
            return match[0]
        return self._placeholder("ipv6", address.compressed, _ipv6)

    def _v4(self, match: re.Match[str]) -> str:
        try:
            address = ipaddress.IPv4Address(match[0])
        except ValueError:
            return match[0]
        if address.is_private or address.is_loopback or address.is_link_local:
            return self._placeholder("ipv4-private", str(address), _PRIVATE_V4)
        return self._placeholder("ipv4-public", str(address), _PUBLIC_V4)

    def text(self, text: str) -> str:
        """``text`` with the configured kinds replaced (MACs, then IPv6, then IPv4: a MAC or an IPv6
        address is never read as parts of another kind)."""
        if "mac" in self.kinds:
            text = _MAC.sub(self._mac, text)
        if "ipv6" in self.kinds:
            text = _IPV6.sub(self._v6, text)
        if "ipv4" in self.kinds:
            text = _IPV4.sub(self._v4, text)
        return text

    def exchange(self, exchange: CapturedExchange) -> CapturedExchange:
        """``exchange`` with its messages, prompt and answer redacted (unchanged when no kind is set)."""
        if not self.kinds:
            return exchange
        messages = [m.model_copy(update={"content": self.text(m.content)}) for m in exchange.messages]
        return exchange.model_copy(
            update={
                "messages": messages,
                "prompt": None if exchange.prompt is None else self.text(exchange.prompt),
                "answer": self.text(exchange.answer),
                "redacted": list(self.kinds),
            }
        )
