"""Console users and login sessions: argon2id password hashes, random session tokens, roles.

Roles: ``staff`` (review transcripts, annotate, export, handoff queue) and
``operator`` (everything staff may do, plus re-index, training, promotion and
analytics). A session token is 32 random bytes (URL-safe base64) kept in an
HttpOnly cookie; the database stores only its SHA-256, so a leaked database
holds no usable session. Repeated failed logins of one user name from one client
address lock that pair out for a short while; other addresses can still log in as
that user, so nobody can keep a user (``admin``) locked out from elsewhere.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import secrets
import threading
import time

from chatbot.errors import AuthError, InvalidInputError, PermissionDeniedError
from chatbot.store import USER_ROLES, Store, User

#: Name of the console session cookie.
COOKIE_NAME = "chatbot_console"
MIN_PASSWORD_CHARS = 8
#: Each role and the roles whose rights it includes.
ROLE_INCLUDES = {"staff": {"staff"}, "operator": {"staff", "operator"}}


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2id, the library's recommended parameters


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (salted; the encoded string carries the parameters).

    Raises:
        InvalidInputError: shorter than :data:`MIN_PASSWORD_CHARS` characters.
    """
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        n = len(password) if isinstance(password, str) else type(password).__name__
        raise InvalidInputError(f"password must be at least {MIN_PASSWORD_CHARS} characters, got {n}")
    return _hasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when ``password`` matches ``password_hash`` (False on any mismatch or malformed hash)."""
    from argon2.exceptions import Argon2Error, InvalidHashError

    try:
        return _hasher().verify(password_hash, password)
    except (Argon2Error, InvalidHashError, ValueError):
        return False


def token_hash(token: str) -> str:
    """SHA-256 hex digest of a session token (what the database keeps)."""
    return hashlib.sha256(token.encode()).hexdigest()


def request_token(request) -> str | None:
    """The session token a request carries: the :data:`COOKIE_NAME` cookie, else an ``Authorization: Bearer``
    header (``request``: anything with Starlette's ``cookies`` and ``headers`` mappings)."""
    token = request.cookies.get(COOKIE_NAME)
    if token:
        return token
    h = request.headers.get("authorization", "")
    return h[7:].strip() if h.lower().startswith("bearer ") else None


def has_role(user: User | None, role: str) -> bool:
    """True when ``user`` is active and its role includes ``role``."""
    return user is not None and user.active and role in ROLE_INCLUDES.get(user.role, set())


class Auth:
    """Logins against the store's users.

    Args:
        store: the conversation log store (users and sessions live there).
        session_hours: a session's lifetime.
        max_failures: failed logins of one user name from one client address before that pair is locked out.
        lockout_s: length of that lock-out, seconds.
    """

    def __init__(self, store: Store, session_hours: float = 12.0, max_failures: int = 5,
                 lockout_s: float = 60.0) -> None:
        if session_hours <= 0:
            raise InvalidInputError(f"session_hours must be > 0, got {session_hours}")
        self.store = store
        self.session_hours = session_hours
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self._failures: dict[tuple[str, str | None], tuple[int, float]] = {}  # (name, address) -> (n, since)
        self._lock = threading.Lock()
        self._dummy_hash: str | None = None

    @classmethod
    def open(cls, database_url: str, **kwargs) -> Auth:
        """An :class:`Auth` on its own store opened at ``database_url`` (the ``users`` command); :meth:`close` it.

        Raises:
            StoreError: the database cannot be opened.
        """
        return cls(Store(database_url), **kwargs)

    def close(self) -> None:
        """Close the store (only for an :class:`Auth` made by :meth:`open`)."""
        self.store.close()

    def list_users(self) -> list[User]:
        """Every console user, active or not (the store's order)."""
        return self.store.list_users()

    def add_user(self, username: str, password: str, role: str = "staff") -> User:
        """Create a user with a hashed password.

        Raises:
            InvalidInputError: bad name, role or password, or the name is taken.
        """
        if role not in USER_ROLES:
            raise InvalidInputError(f"role must be one of {USER_ROLES}, got {role!r}")
        return self.store.add_user(username, hash_password(password), role)

    def set_password(self, username: str, password: str) -> User:
        """Change a user's password (ends the user's sessions).

        Raises:
            NotFoundError: no such user.
            InvalidInputError: the password is too short.
        """
        return self.store.update_user(username, password_hash=hash_password(password))

    def ensure_user(self, username: str, password: str, role: str = "operator") -> bool:
        """Create the user unless one with that name exists (start-up bootstrap); True when created."""
        if self.store.get_user(username) is not None:
            return False
        try:
            self.add_user(username, password, role)
        except InvalidInputError:
            if self.store.get_user(username) is not None:  # another process created it meanwhile
                return False
            raise
        return True

    def authenticate(self, username: str, password: str, client: str | None = None) -> User:
        """The active user with these credentials.

        Args:
            client: the caller's address; failures are counted per (user name, address).

        Raises:
            AuthError: unknown user, wrong password, inactive user, or too many recent failures of this
                user name from this address (the message does not say which).
        """
        now = time.monotonic()
        key = (username, client)
        with self._lock:
            self._forget_old(now)
            n, since = self._failures.get(key, (0, now))
            if n >= self.max_failures and now - since < self.lockout_s:
                raise AuthError(f"too many failed logins for {username!r}; try again in "
                                f"{int(self.lockout_s - (now - since)) + 1} s")
        user = self.store.get_user(username) if username else None
        if user is None:
            if self._dummy_hash is None:
                self._dummy_hash = _hasher().hash(secrets.token_hex(8))
            verify_password(self._dummy_hash, password or "")  # same time as a real check
            ok = False
        else:
            ok = user.active and verify_password(user.password_hash, password or "")
        with self._lock:
            if not ok:
                n, since = self._failures.get(key, (0, now))
                if now - since >= self.lockout_s:
                    n, since = 0, now
                self._failures[key] = (n + 1, since if n else now)
                raise AuthError("wrong user name or password")
            self._failures.pop(key, None)
        return user

    def _forget_old(self, now: float) -> None:
        """Drop failure records older than the lock-out (they no longer count; keeps the table small)."""
        if len(self._failures) > 1000:
            for k in [k for k, (_n, since) in self._failures.items() if now - since >= self.lockout_s]:
                del self._failures[k]

    def login(self, username: str, password: str, client: str | None = None) -> tuple[str, User]:
        """Check the credentials and open a session; return (token for the cookie, user).

        Args:
            client: the caller's address (see :meth:`authenticate`).

        Raises:
            AuthError: see :meth:`authenticate`.
        """
        user = self.authenticate(username, password, client)
        token = secrets.token_urlsafe(32)
        expires = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(hours=self.session_hours)
        self.store.create_session(user.id, token_hash(token), expires)
        return token, user

    def user_for_token(self, token: str | None) -> User | None:
        """The user of a live session token, or None (no token, unknown, expired, user inactive)."""
        if not token or len(token) > 200:
            return None
        return self.store.session_user(token_hash(token))

    def logout(self, token: str | None) -> None:
        """End the session of ``token`` (no error when there is none)."""
        if token and len(token) <= 200:
            self.store.delete_session(token_hash(token))

    @staticmethod
    def require(user: User | None, role: str) -> User:
        """Return ``user`` when its role includes ``role``.

        Raises:
            AuthError: no user (not logged in).
            PermissionDeniedError: the user's role does not include ``role``.
        """
        if user is None:
            raise AuthError("login required")
        if not has_role(user, role):
            raise PermissionDeniedError(f"user {user.username!r} (role {user.role!r}) may not do {role} actions")
        return user


# User is the store's row type; the console faces name it through here, never by importing the store.
__all__ = ["COOKIE_NAME", "MIN_PASSWORD_CHARS", "ROLE_INCLUDES", "Auth", "User", "has_role", "hash_password",
           "request_token", "token_hash", "verify_password"]
