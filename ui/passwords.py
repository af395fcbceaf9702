"""Annotator passwords: scrypt (a memory-hard KDF from the standard library), never the password itself.

A stored hash carries its own parameters and salt (`scrypt$n$r$p$salt_hex$hash_hex`), so the cost can
be raised later without invalidating the hashes already stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

# n=2**14, r=8: 16 MiB and some tens of ms per hash — slow for a guesser, fine for a login.
N, R, P = 2**14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
_MAXMEM = 64 * 1024 * 1024


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES, maxmem=_MAXMEM)


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("password: must not be empty")
    salt = secrets.token_bytes(SALT_BYTES)
    return f"scrypt${N}${R}${P}${salt.hex()}${_derive(password, salt, N, R, P).hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time comparison; a malformed stored hash verifies nothing."""
    try:
        scheme, n, r, p, salt_hex, key_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        candidate = _derive(password, bytes.fromhex(salt_hex), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(candidate, bytes.fromhex(key_hex))


# Checked against for unknown or disabled names, so that they cost the same scrypt call as a real one
# and response time does not tell which names exist.
DUMMY_HASH = hash_password(secrets.token_hex(16))
