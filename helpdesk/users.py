"""Staff users: accounts, argon2 password hashes, and the ``helpdesk user`` command.

Invariants:
- a password is stored only as an argon2id hash (argon2-cffi's ``PasswordHasher``); hashing
  and verifying run in a worker thread so a login never stalls the event loop;
- ``authenticate`` spends the same argon2 work whether or not the address exists, so the
  answer time does not tell which staff addresses are real;
- addresses are stored lowercased; roles are ``agent`` or ``admin``;
- the caller owns the transaction: these functions add and flush, they never commit.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import sys
from collections.abc import Callable
from typing import Annotated

import anyio.to_thread
import typer
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk.config import Settings
from helpdesk.errors import InvalidInputError, NotFoundError
from helpdesk.models import StaffUser, utcnow

ROLES = ("agent", "admin")
MIN_PASSWORD_LENGTH = 10

# Module-level so tests can swap in cheaper parameters; production uses the library defaults.
hasher = PasswordHasher()
_DUMMY_HASH: str | None = None


def normalise_email(email: str) -> str:
    email = email.strip().lower()
    if "@" not in email or any(c in email for c in " \r\n\t<>,;") or len(email) > 320:
        raise InvalidInputError(f"not a plain e-mail address: {email!r}")
    return email


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInputError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


def password_version(user: StaffUser) -> str:
    """A short fingerprint of the hash: sessions carry it, so a new password ends them."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]


async def hash_password(password: str) -> str:
    return await anyio.to_thread.run_sync(hasher.hash, password)


def _verify(hash_: str, password: str) -> bool:
    try:
        return hasher.verify(hash_, password)
    except (VerificationError, InvalidHashError):
        return False


async def add_user(
    session: AsyncSession, *, email: str, role: str, password: str, name: str = ""
) -> StaffUser:
    email = normalise_email(email)
    if role not in ROLES:
        raise InvalidInputError(f"role must be one of {', '.join(ROLES)}")
    check_password(password)
    existing = (await session.exec(select(StaffUser).where(StaffUser.email == email))).first()
    if existing is not None:
        raise InvalidInputError(f"a staff user {email} already exists")
    user = StaffUser(
        email=email, name=name.strip()[:200], role=role, password_hash=await hash_password(password)
    )
    session.add(user)
    await session.flush()
    return user


async def get_user(session: AsyncSession, *, user_id: int) -> StaffUser:
    user = await session.get(StaffUser, user_id)
    if user is None:
        raise NotFoundError(f"no staff user {user_id}")
    return user


async def list_users(session: AsyncSession, *, active_only: bool = False) -> list[StaffUser]:
    query = select(StaffUser).order_by(col(StaffUser.email))
    if active_only:
        query = query.where(col(StaffUser.active).is_(True))
    return list((await session.exec(query)).all())


async def set_password(session: AsyncSession, *, user_id: int, password: str) -> StaffUser:
    check_password(password)
    user = await get_user(session, user_id=user_id)
    user.password_hash = await hash_password(password)
    return user


async def set_active(session: AsyncSession, *, user_id: int, active: bool) -> StaffUser:
    user = await get_user(session, user_id=user_id)
    user.active = active
    return user


async def authenticate(session: AsyncSession, *, email: str, password: str) -> StaffUser | None:
    """The active user with this address and password, or None (same cost either way)."""
    global _DUMMY_HASH
    try:
        email = normalise_email(email)
    except InvalidInputError:
        email = ""
    user = None
    if email:
        user = (await session.exec(select(StaffUser).where(StaffUser.email == email))).first()
    if user is None or not user.active or not user.password_hash:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = await hash_password("not the password of anybody")
        await anyio.to_thread.run_sync(_verify, _DUMMY_HASH, password)
        return None
    if not await anyio.to_thread.run_sync(_verify, user.password_hash, password):
        return None
    if hasher.check_needs_rehash(user.password_hash):
        user.password_hash = await hash_password(password)
    user.last_login_at = utcnow()
    return user


# --- the `helpdesk user` command -----------------------------------------------------------


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Password (again): ")
    if first != second:
        raise InvalidInputError("the two passwords differ")
    return first


def register(parent: typer.Typer, get_settings: Callable[[], Settings]) -> None:
    """Add the ``user`` sub-command (``helpdesk user add EMAIL --role agent|admin``)."""
    app = typer.Typer(help="Manage staff users of the web UI.", no_args_is_help=True)

    @app.command("add")
    def add(
        email: Annotated[str, typer.Argument(help="The staff member's e-mail address.")],
        role: Annotated[str, typer.Option(help="agent or admin.")] = "agent",
        name: Annotated[str, typer.Option(help="Display name.")] = "",
        password_stdin: Annotated[
            bool, typer.Option("--password-stdin", help="Read the password from stdin.")
        ] = False,
    ) -> None:
        """Create a staff user (prompts for the password twice)."""
        from helpdesk.db import open_database

        try:
            password = _read_password(password_stdin)
            check_password(password)
            if role not in ROLES:
                raise InvalidInputError(f"role must be one of {', '.join(ROLES)}")
        except InvalidInputError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        settings = get_settings()

        async def _run() -> StaffUser:
            async with open_database(settings) as (_engine, sessions), sessions() as session:
                user = await add_user(session, email=email, role=role, password=password, name=name)
                await session.commit()
                return user

        try:
            user = asyncio.run(_run())
        except InvalidInputError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"added {user.role} {user.email} (id {user.id})")

    parent.add_typer(app, name="user")
