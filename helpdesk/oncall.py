"""The on-call rota: staff who are paged for crisis mail, grouped in numbered levels.

Level 1 is paged first, then level 2, and so on (the timing lives in
:mod:`helpdesk.escalation`). A level with no active member is skipped, so ``levels()``
lists only the levels that can actually be paged.

Invariants: one row per lowercased e-mail address (adding an existing address updates
it); ``level >= 1``. These functions add to the session and flush; the caller commits.
"""

from __future__ import annotations

import re

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk.errors import InvalidInputError, NotFoundError
from helpdesk.models import OnCallMember

# Deliberately plain: one @, no whitespace or header punctuation, a dot in the domain.
# Staff addresses are typed by an operator, so we want typos caught, not RFC 5322 in full.
_EMAIL_RE = re.compile(r"^[^@\s<>(),;:\"\[\]]+@[^@\s<>(),;:\"\[\]]+\.[^@\s<>(),;:\"\[\].]+$")


def normalize_email(address: str) -> str:
    """The address stripped and lowercased, or ``InvalidInputError`` if it is not one."""
    cleaned = address.strip().lower()
    if len(cleaned) > 320 or not _EMAIL_RE.match(cleaned):
        raise InvalidInputError(f"not a valid e-mail address: {address!r}")
    return cleaned


async def add_member(
    session: AsyncSession,
    *,
    email: str,
    level: int,
    name: str = "",
    phone: str = "",
    webhook_url: str = "",
) -> OnCallMember:
    """Add a member to the rota, or update the member with that address."""
    address = normalize_email(email)
    if level < 1:
        raise InvalidInputError(f"on-call level must be 1 or more, not {level}")
    if any(c in value for value in (name, phone, webhook_url) for c in "\r\n"):
        raise InvalidInputError("name, phone and webhook URL must be one line each")
    if webhook_url and not webhook_url.startswith(("https://", "http://")):
        raise InvalidInputError(f"webhook URL must start with https:// or http://: {webhook_url!r}")
    member = await _get(session, address)
    if member is None:
        member = OnCallMember(email=address)
    member.level = level
    member.name = name.strip()
    member.phone = phone.strip()
    member.webhook_url = webhook_url.strip()
    member.active = True
    session.add(member)
    await session.flush()
    return member


async def remove_member(session: AsyncSession, *, email: str) -> None:
    """Remove a member; ``NotFoundError`` if nobody on the rota has that address."""
    member = await _get(session, email.strip().lower())
    if member is None:
        raise NotFoundError(f"no on-call member {email.strip()!r}")
    await session.delete(member)
    await session.flush()


async def get_member(session: AsyncSession, email: str) -> OnCallMember | None:
    return await _get(session, email.strip().lower())


async def list_members(session: AsyncSession) -> list[OnCallMember]:
    """Every member, active or not, by level then address."""
    rows = await session.exec(
        select(OnCallMember).order_by(col(OnCallMember.level), col(OnCallMember.email))
    )
    return list(rows.all())


async def members_at_level(session: AsyncSession, level: int) -> list[OnCallMember]:
    """The active members of one level, by address."""
    rows = await session.exec(
        select(OnCallMember)
        .where(OnCallMember.level == level, col(OnCallMember.active).is_(True))
        .order_by(col(OnCallMember.email))
    )
    return list(rows.all())


async def levels(session: AsyncSession) -> list[int]:
    """The levels that have at least one active member, ascending."""
    rows = await session.exec(
        select(OnCallMember.level)
        .where(col(OnCallMember.active).is_(True))
        .distinct()
        .order_by(col(OnCallMember.level))
    )
    return list(rows.all())


async def rota_configured(session: AsyncSession) -> bool:
    """True when at least one active member can be paged."""
    return bool(await levels(session))


async def _get(session: AsyncSession, address: str) -> OnCallMember | None:
    rows = await session.exec(select(OnCallMember).where(OnCallMember.email == address))
    return rows.first()
