"""``helpdesk oncall``: manage the on-call rota from the shell.

The command names, options, exit codes and JSON fields are a contract:

    helpdesk oncall add EMAIL --level N [--name NAME] [--phone P] [--webhook URL]
    helpdesk oncall list [--json]
    helpdesk oncall remove EMAIL

Exit codes: 0 done; 1 no such member; 2 bad input or bad settings (one line on stderr).
Adding an address that is already on the rota updates it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer

from helpdesk import oncall
from helpdesk.config import Settings
from helpdesk.db import open_database
from helpdesk.errors import HelpdeskError, InvalidInputError, NotFoundError
from helpdesk.models import OnCallMember

T = TypeVar("T")

HELP = "Manage the on-call rota paged for crisis mail (level 1 first, then 2, then 3)."


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _as_dict(member: OnCallMember) -> dict[str, object]:
    return {
        "email": member.email,
        "level": member.level,
        "name": member.name,
        "phone": member.phone,
        "webhook": bool(member.webhook_url),
        "active": member.active,
    }


def _table(members: list[OnCallMember]) -> str:
    if not members:
        return (
            "no on-call members: crisis mail will page nobody (add one with `helpdesk oncall add`)"
        )
    rows = [("LEVEL", "EMAIL", "NAME", "PHONE", "WEBHOOK")]
    rows += [
        (str(m.level), m.email, m.name, m.phone, "yes" if m.webhook_url else "") for m in members
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def build_app(get_settings: Callable[[], Settings]) -> typer.Typer:
    """The ``oncall`` command group, reading its settings through ``get_settings``."""
    app = typer.Typer(help=HELP, no_args_is_help=True)

    @app.command("add")
    def add(
        email: Annotated[str, typer.Argument(help="The staff member's e-mail address.")],
        level: Annotated[int, typer.Option("--level", help="1 = paged first; 2, 3… later.")],
        name: Annotated[str, typer.Option(help="Display name.")] = "",
        phone: Annotated[str, typer.Option(help="Phone number (shown to colleagues).")] = "",
        webhook: Annotated[
            str, typer.Option(help="This member's own webhook (PagerDuty Events v2 shape).")
        ] = "",
    ) -> None:
        """Add a member to the rota, or update the member with that address."""
        try:
            oncall.normalize_email(email)
            if level < 1:
                raise InvalidInputError(f"on-call level must be 1 or more, not {level}")
        except InvalidInputError as exc:
            raise _fail(str(exc), 2) from None
        settings = get_settings()

        async def _run() -> OnCallMember:
            async with open_database(settings) as (_engine, sessions), sessions() as session:
                member = await oncall.add_member(
                    session, email=email, level=level, name=name, phone=phone, webhook_url=webhook
                )
                await session.commit()
                return member

        member = _run_or_exit(_run)
        typer.echo(f"on-call level {member.level}: {member.email}")

    @app.command("list")
    def list_(
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Show the rota by level."""
        settings = get_settings()

        async def _run() -> list[OnCallMember]:
            async with open_database(settings) as (_engine, sessions), sessions() as session:
                return await oncall.list_members(session)

        members = _run_or_exit(_run)
        if as_json:
            typer.echo(json.dumps([_as_dict(m) for m in members], indent=2))
        else:
            typer.echo(_table(members))

    @app.command("remove")
    def remove(
        email: Annotated[str, typer.Argument(help="The address to take off the rota.")],
    ) -> None:
        """Take a member off the rota."""
        settings = get_settings()

        async def _run() -> None:
            async with open_database(settings) as (_engine, sessions), sessions() as session:
                await oncall.remove_member(session, email=email)
                await session.commit()

        _run_or_exit(_run)
        typer.echo(f"removed from the on-call rota: {email.strip().lower()}")

    return app


def _run_or_exit(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one database job; our own errors become one line and an exit code."""
    try:
        return asyncio.run(make())
    except NotFoundError as exc:
        raise _fail(str(exc), 1) from None
    except HelpdeskError as exc:
        raise _fail(str(exc), 2) from None


def register(parent: typer.Typer, get_settings: Callable[[], Settings]) -> None:
    """Add the ``oncall`` command group to ``parent``."""
    parent.add_typer(build_app(get_settings), name="oncall")
