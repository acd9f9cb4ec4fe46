"""Console users and their login sessions (the hashing and the login policy live in :mod:`chatbot.auth`)."""

from __future__ import annotations

import datetime as _dt

from sqlmodel import Session, select

from chatbot.errors import InvalidInputError, NotFoundError
from chatbot.store.base import StoreBase
from chatbot.store.schema import USER_ROLES, AuthSession, User, _now, as_utc


class UserStore(StoreBase):
    """Console users and login sessions (part of :class:`chatbot.store.Store`)."""

    def add_user(self, username: str, password_hash: str, role: str = "staff") -> User:
        """Create a console user.

        Raises:
            InvalidInputError: bad username or role, or the username is taken.
        """
        if role not in USER_ROLES:
            raise InvalidInputError(f"role must be one of {USER_ROLES}, got {role!r}")
        bare = username.replace("_", "").replace(".", "").replace("-", "") if isinstance(username, str) else ""
        if not username or len(username) > 64 or not bare.isalnum():
            raise InvalidInputError(f"username must be 1..64 letters, digits, '.', '_' or '-', got {username!r}")

        def fn(s: Session) -> User:
            if s.exec(select(User).where(User.username == username)).first() is not None:
                raise InvalidInputError(f"username {username!r} is taken")
            u = User(username=username, password_hash=password_hash, role=role)
            s.add(u)
            s.flush()
            return u

        return self._write("create the user", fn)

    def get_user(self, username: str) -> User | None:
        """The user with this name, or None."""
        return self._read("read the user", lambda s: s.exec(select(User).where(User.username == username)).first())

    def list_users(self) -> list[User]:
        """All console users by name."""
        return self._read("list the users", lambda s: list(s.exec(select(User).order_by(User.username)).all()))

    def update_user(self, username: str, password_hash: str | None = None, role: str | None = None,
                    active: bool | None = None) -> User:
        """Change a user's password hash, role or active flag (a deactivated user's sessions end).

        Raises:
            NotFoundError: no such user.
            InvalidInputError: bad role.
        """
        if role is not None and role not in USER_ROLES:
            raise InvalidInputError(f"role must be one of {USER_ROLES}, got {role!r}")

        def fn(s: Session) -> User:
            u = s.exec(select(User).where(User.username == username)).first()
            if u is None:
                raise NotFoundError(f"user {username!r} does not exist")
            if password_hash is not None:
                u.password_hash = password_hash
            if role is not None:
                u.role = role
            if active is not None:
                u.active = active
            if password_hash is not None or active is False:
                for sess in s.exec(select(AuthSession).where(AuthSession.user_id == u.id)).all():
                    s.delete(sess)
            s.add(u)
            s.flush()
            return u

        return self._write("update the user", fn)

    def create_session(self, user_id: int, token_hash: str, expires_at: _dt.datetime) -> None:
        """Store a login session (and drop expired ones)."""

        def fn(s: Session) -> None:
            s.add(AuthSession(token_hash=token_hash, user_id=user_id, expires_at=expires_at))
            u = s.get(User, user_id)
            if u is not None:
                u.last_login_at = _now()
                s.add(u)
            for old in s.exec(select(AuthSession).where(AuthSession.expires_at < _now())).all():
                s.delete(old)

        self._write("create the session", fn)

    def session_user(self, token_hash: str) -> User | None:
        """The active user of an unexpired session, or None."""

        def fn(s: Session) -> User | None:
            sess = s.get(AuthSession, token_hash)
            if sess is None or as_utc(sess.expires_at) <= _now():
                return None
            u = s.get(User, sess.user_id)
            return u if u is not None and u.active else None

        return self._read("read the session", fn)

    def delete_session(self, token_hash: str) -> None:
        """End a login session (no error when it does not exist)."""

        def fn(s: Session) -> None:
            sess = s.get(AuthSession, token_hash)
            if sess is not None:
                s.delete(sess)

        self._write("end the session", fn)


__all__ = ["UserStore"]
