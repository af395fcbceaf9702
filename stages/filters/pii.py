"""PII redaction: e-mail addresses, phone numbers, IP addresses and payment card numbers become tokens.

Nothing is dropped: the text keeps its shape, with `<EMAIL>`, `<PHONE>`, `<IP_ADDRESS>` and
`<CARD_NUMBER>` where the data was. Card numbers are 13-19 digits (spaces or dashes allowed) that
pass the Luhn check, so an arbitrary long number is left alone. Loopback, private and other
non-public IP addresses (`127.0.0.1`, `10.0.0.8`, `::1`) identify nobody and stay unless
`redact_private_ips`. Phone numbers are international (`+` and 8-15 digits) or North-American
(`(555) 123-4567`, `555-123-4567`) shaped: bare digit runs are not phone numbers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                   r"[A-Za-z]{2,24}(?![\w-])")
CARD = re.compile(r"(?<![\d-])[0-9](?:[ -]?[0-9]){12,18}(?![\d-])")
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}"
                  r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?![0-9]|\.[0-9])")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE = re.compile(r"(?<![\w+])\+[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,4}\)?){2,5}(?![\w])"
                   r"|(?<![\w(])(?:\([0-9]{3}\) ?|[0-9]{3}[-. ])[0-9]{3}[-. ][0-9]{4}(?![\w])")
DIGIT = re.compile(r"[0-9]")
TOKENS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "card_number": "<CARD_NUMBER>"}


def luhn_valid(number: str) -> bool:
    """The Luhn checksum of a card number's digits (other characters ignored).

    >>> luhn_valid("4111 1111 1111 1111"), luhn_valid("4111 1111 1111 1112")
    (True, False)
    >>> luhn_valid("79927398713")
    True
    """
    digits = [int(c) for c in number if c.isdigit()]
    if not digits:
        return False
    total = sum(digits[-1::-2]) + sum(d * 2 - 9 if d > 4 else d * 2 for d in digits[-2::-2])
    return total % 10 == 0


def _public_ip(candidate: str, keep_private: bool) -> bool:
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return keep_private or ip.is_global


@dataclass(frozen=True, kw_only=True)
class PIIConfig:
    NAME: ClassVar[str] = "pii"
    enabled: bool = True
    emails: bool = True
    phones: bool = True
    ip_addresses: bool = True
    card_numbers: bool = True
    redact_private_ips: bool = False

    def __call__(self, text: str) -> tuple[str, dict[str, int]]:
        """(redacted text, {kind: redactions}) with only the kinds that occurred.

        >>> PIIConfig()("Mail ada@example.org or call +44 20 7946 0958 from 8.8.8.8 (not 127.0.0.1).")
        ('Mail <EMAIL> or call <PHONE> from <IP_ADDRESS> (not 127.0.0.1).', {'email': 1, 'ip_address': 1, 'phone': 1})
        >>> PIIConfig()("Paid with 4111-1111-1111-1111; order 4111111111111112.")
        ('Paid with <CARD_NUMBER>; order 4111111111111112.', {'card_number': 1})
        >>> PIIConfig()("2001:db8::1 is documentation; 2a00:1450:4001:81b::200e is not.")
        ('2001:db8::1 is documentation; <IP_ADDRESS> is not.', {'ip_address': 1})
        """
        counts: dict[str, int] = {}
        if "@" in text and self.emails:
            text = _sub(EMAIL, "email", text, counts)
        if DIGIT.search(text) is None:  # every other kind needs digits: skip four scans
            return text, counts
        if self.card_numbers:
            text = _sub(CARD, "card_number", text, counts, luhn_valid)
        if self.ip_addresses:
            keep = self.redact_private_ips
            if "." in text:
                text = _sub(IPV4, "ip_address", text, counts, lambda s: _public_ip(s, keep))
            if ":" in text:
                text = _sub(IPV6, "ip_address", text, counts,
                            lambda s: sum(1 for g in s.split(":") if g) >= 3 and _public_ip(s, keep))
        if self.phones:
            text = _sub(PHONE, "phone", text, counts,
                        lambda s: 8 <= sum(c.isdigit() for c in s) <= 15 if s.startswith("+") else True)
        return text, counts


def _sub(pattern: re.Pattern[str], kind: str, text: str, counts: dict[str, int],
         accept: Callable[[str], bool] | None = None) -> str:
    token = TOKENS[kind]

    def replace(match: re.Match[str]) -> str:
        if accept is not None and not accept(match.group()):
            return match.group()
        counts[kind] = counts.get(kind, 0) + 1
        return token

    return pattern.sub(replace, text)
