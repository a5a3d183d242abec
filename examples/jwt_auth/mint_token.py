"""Make a test RS256 key pair and mint tokens for the jwt_auth example.

    python examples/jwt_auth/mint_token.py                     # alice, valid for an hour
    python examples/jwt_auth/mint_token.py --sub bob --claim role=admin --expires-in 60
    python examples/jwt_auth/mint_token.py --expires-in -60    # already expired

The first run writes ``keys/private.pem`` and ``keys/public.pem`` beside this file (the
server reads ``keys/public.pem`` by default). They are test keys: never deploy them.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

KEYS_DIR = Path(__file__).resolve().parent / "keys"


def generate_keys() -> tuple[bytes, bytes]:
    """A fresh RSA key pair as ``(private PEM, public PEM)``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def ensure_keys(folder: Path = KEYS_DIR) -> tuple[bytes, bytes]:
    """Read the key pair in ``folder``, creating it on first use."""
    private_path, public_path = folder / "private.pem", folder / "public.pem"
    if not private_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        private, public = generate_keys()
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private)
        public_path.write_bytes(public)
    return private_path.read_bytes(), public_path.read_bytes()


def mint(private_key: bytes, claims: Mapping[str, Any], expires_in: float = 3600) -> str:
    """An RS256 token with ``claims``, issued now and expiring ``expires_in`` seconds from now."""
    now = int(time.time())
    payload = {"iat": now, "exp": now + int(expires_in), **claims}
    return jwt.encode(payload, private_key, algorithm="RS256")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sub", default="alice", help="subject claim (default alice)")
    parser.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE",
                        help="another claim (repeatable)")
    parser.add_argument("--expires-in", type=float, default=3600,
                        help="seconds until expiry; negative for an expired token")
    parser.add_argument("--keys", type=Path, default=KEYS_DIR, help="key pair folder")
    args = parser.parse_args()
    claims: dict[str, Any] = {"sub": args.sub}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--claim {item!r}: expected NAME=VALUE")
        claims[name] = value
    private, _ = ensure_keys(args.keys)
    print(mint(private, claims, args.expires_in))


if __name__ == "__main__":
    main()
