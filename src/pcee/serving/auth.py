"""Who may write: a bearer token for the service's writes, and a per-client rate limit on feedback.

Feedback labels drive the labelled recalibration, so anyone who can post them can move the champion.
With a token configured (``PCEE_SERVE_TOKEN``), ``POST /feedback`` needs ``Authorization: Bearer
<token>``, and ``POST /predict`` too when ``PCEE_SERVE_TOKEN_PREDICT`` is set. The comparison is
constant-time: both sides are hashed to 32 bytes first and compared with :func:`hmac.compare_digest`,
so neither the token's content nor its length shows in the time a refusal takes.

``make up`` generates a token once into the state directory (:func:`ensure_token_file`, 0600) and
puts it in the clients' environment (``env.sh``); ``pcee traffic``, the demo and the benchmarks send it.

The rate limit (``PCEE_SERVE_FEEDBACK_RATE_LIMIT``, e.g. ``100/second``, in the notation of the
``limits`` library) counts each client address in a moving window kept in memory: one replica's
count, which is what one process can enforce.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from pcee.settings import Settings

#: the token file ``make up`` writes in the state directory
TOKEN_FILE = "serve_token"


def generate_token() -> str:
    """A fresh random token (32 bytes, URL-safe text)."""
    return secrets.token_urlsafe(32)


def ensure_token_file(state_dir: Path) -> str:
    """The token kept in ``state_dir/serve_token``, generated (0600) the first time."""
    path = Path(state_dir) / TOKEN_FILE
    if path.is_file():
        token = path.read_text().strip()
        if len(token) >= 16:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = generate_token()
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.chmod(0o600)
    tmp.write_text(token + "\n")
    tmp.replace(path)
    return token


def client_token(settings: Settings) -> str | None:
    """The token a client sends: ``PCEE_SERVE_TOKEN``, else the one ``make up`` generated in the state dir."""
    if settings.serve_token is not None:
        return settings.serve_token.get_secret_value()
    path = settings.state_dir / TOKEN_FILE
    return path.read_text().strip() or None if path.is_file() else None


def bearer_header(token: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}``, or nothing without a token."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class BearerAuth:
    """Checks ``Authorization`` headers against one token; ``token=None`` lets everything through."""

    def __init__(self, token: str | None) -> None:
        self._digest = None if token is None else _digest(token)

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the token (scheme ``Bearer``, any case)."""
        if self._digest is None:
            return True
        scheme, _, given = (authorization or "").strip().partition(" ")
        # compare even when the scheme is wrong, so that every refusal takes the same path
        same = hmac.compare_digest(_digest(given.strip()), self._digest)
        return same and scheme.lower() == "bearer"


class ClientRateLimit:
    """A per-client moving-window limit (``limits``' notation, e.g. ``100/second;2000/minute``); an empty
    text disables it."""

    def __init__(self, text: str) -> None:
        self.items = parse_many(text) if text.strip() else []
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, client: str) -> float | None:
        """Count one request of ``client``; None when allowed, else the seconds until it may retry."""
        for item in self.items:
            if not self._limiter.hit(item, client):
                reset_at, _ = self._limiter.get_window_stats(item, client)
                return max(0.0, reset_at - time.time())
        return None
