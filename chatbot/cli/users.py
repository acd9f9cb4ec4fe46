"""``users add|passwd|list``: console users (staff and operators)."""

from __future__ import annotations

import sys

from chatbot.cli.common import settings


def cmd_users(args) -> int:
    """Add a console user, change a password, or list the users (staff and operators)."""
    import getpass
    import os

    from chatbot.auth import Auth

    if args.action != "list" and not args.name:
        print(f"error: users {args.action} needs a user name", file=sys.stderr)
        return 2
    s = settings()
    auth = Auth.open(s.resolved_database_url)
    try:
        if args.action == "list":
            for u in auth.list_users():
                print(f"{u.username}\t{u.role}\t{'active' if u.active else 'inactive'}")
            return 0
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = os.environ.get("CHATBOT_NEW_USER_PASSWORD") or getpass.getpass(f"password for {args.name}: ")
        if args.action == "add":
            u = auth.add_user(args.name, password, args.role)
            print(f"added {u.role} {u.username}")
        else:
            auth.set_password(args.name, password)
            print(f"changed the password of {args.name}")
        return 0
    finally:
        auth.close()


def register(sub, eval_targets) -> None:
    """Add ``users``."""
    sp = sub.add_parser("users", help="console users: add, passwd, list")
    sp.add_argument("action", choices=["add", "passwd", "list"])
    sp.add_argument("name", nargs="?", help="user name (add, passwd)")
    sp.add_argument("--role", choices=["staff", "operator"], default="staff", help="role of a new user")
    sp.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of stdin (else CHATBOT_NEW_USER_PASSWORD or a prompt)")
    sp.set_defaults(func=cmd_users)