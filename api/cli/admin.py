"""``lmbatch db upgrade``, ``lmbatch keys …`` and ``lmbatch tenants list | set``: what an operator does to the
database directly.

Unlike the client commands (api/cli/jobs.py, api/cli/models.py) these open the database named by the settings
(``LMBATCH_DATABASE_URL``), so they run on a host that reaches it, and an API key is made here before any
request can carry one. SQLAlchemy, the migrations and the built-in models are imported inside the commands:
``lmbatch --help`` stays instant.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from api.cli.common import CliError, out, settings_of, show

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Session

admin_app = typer.Typer()  # merged into the root app: `lmbatch db …` and `lmbatch keys …`
db_app = typer.Typer(help="The SQL database: schema and built-in models.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of tenants.", no_args_is_help=True)
admin_app.add_typer(db_app, name="db")
admin_app.add_typer(keys_app, name="keys")
tenants_app = typer.Typer(help="Tenants and their limits.", no_args_is_help=True)
admin_app.add_typer(tenants_app, name="tenants")


# ---------------------------------------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    builtins: Annotated[
        bool,
        typer.Option(
            "--builtins/--no-builtins", help="Prepare and register the built-in models (the first time takes ~20 s)."
        ),
    ] = True,
) -> None:
    """Apply the schema migrations, then make sure the built-in models are registered."""
    from sqlalchemy.engine import make_url

    from db.migrate import current_heads, upgrade

    settings = settings_of(ctx)
    upgrade(settings)
    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    out.print(f"database {shown}: schema at {', '.join(current_heads(settings))}")
    if not builtins:
        return
    from workers.models.builtins import ensure_builtin_models

    out.print(f"built-in models: preparing in {settings.model_store}")
    registered = ensure_builtin_models(settings)
    out.print(
        f"built-in models: registered {', '.join(registered)}" if registered else "built-in models: already registered"
    )


# -------------------------------------------------------------------------------------------------- keys


DURATION = re.compile(r"(\d+)\s*([mhdw])")
DURATION_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w`: how long a key lives."""
    match = DURATION.fullmatch(text.strip().lower())
    if match is None or int(match[1]) == 0:
        raise CliError(f"--expires-in {text!r}: give a positive number and a unit, like 30d, 12h, 90m or 2w")
    return timedelta(**{DURATION_UNITS[match[2]]: int(match[1])})


def parse_instant(text: str) -> datetime:
    """An ISO 8601 date or time (`2030-01-31`, `2030-01-31T18:00+02:00`); one without a zone is in UTC."""
    try:
        instant = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(f"--expires-at {text!r}: not an ISO 8601 date or time (like 2030-01-31T18:00Z)") from None
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)


def expiry(expires_in: str | None, expires_at: str | None) -> datetime | None:
    if expires_in is not None and expires_at is not None:
        raise CliError("give --expires-in or --expires-at, not both")
    if expires_in is None and expires_at is None:
        return None
    now = datetime.now(UTC)
    try:
        instant = now + parse_duration(expires_in) if expires_in is not None else parse_instant(expires_at or "")
    except OverflowError:
        raise CliError(f"--expires-in {expires_in}: beyond the year 9999") from None
    if instant <= now:
        raise CliError(f"--expires-at {expires_at}: already past")
    return instant


def utc_text(instant: datetime | None) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if instant is not None else "-"


@contextmanager
def database_session(ctx: typer.Context) -> Iterator[Session]:
    """One write transaction on the database the settings name; the engine is closed after it."""
    from db.session import make_engine, make_session_factory, transaction

    engine = make_engine(settings_of(ctx))
    try:
        with transaction(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant name; created if new.")],
    admin: Annotated[
        bool, typer.Option("--admin", help="An admin key: manages models, jobs and batches of every tenant.")
    ] = False,
    expires_in: Annotated[
        str | None, typer.Option("--expires-in", help="Lifetime: 30d, 12h, 90m or 2w. Default: until revoked.")
    ] = None,
    expires_at: Annotated[
        str | None,
        typer.Option("--expires-at", help="Expiry as an ISO 8601 date or time (UTC unless it names a zone)."),
    ] = None,
) -> None:
    """Make an API key. It is printed once, as the last line; only its sha256 is stored."""
    from db.tenants import issue_key

    if not tenant.strip():
        raise CliError("--tenant must not be empty")
    until = expiry(expires_in, expires_at)
    with database_session(ctx) as session:
        issued = issue_key(session, tenant_name=tenant.strip(), scope="admin" if admin else "tenant", expires_at=until)
    lifetime = f"expires {utc_text(until)}" if until else "valid until revoked"
    out.print(
        f"created {'an admin' if admin else 'a tenant'} key, id {issued.id}, for tenant {tenant.strip()!r}, "
        f"{lifetime} (shown only now):"
    )
    typer.echo(issued.key)


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's keys.")] = None,
) -> None:
    """Every key, revoked and expired ones included: id, tenant, scope, the key's first characters, dates."""
    from db.tenants import list_keys

    with database_session(ctx) as session:
        keys = list_keys(session, tenant_name=tenant)
    now = datetime.now(UTC)
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "TENANT", "SCOPE", "PREFIX", "STATE", "CREATED", "EXPIRES", "REVOKED"):
        table.add_column(column, no_wrap=True)
    for key in keys:
        state = "revoked" if key.revoked_at else "expired" if key.expires_at and key.expires_at <= now else "live"
        table.add_row(
            str(key.id), key.tenant, key.scope, key.prefix + "…", state,
            utc_text(key.created_at), utc_text(key.expires_at), utc_text(key.revoked_at),
        )  # fmt: skip
    show(table)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[
        str, typer.Argument(metavar="KEY_ID", help="The key's id (see `lmbatch keys list`), or a leaked key itself.")
    ],
) -> None:
    """Revoke a key: requests that carry it are refused from now on."""
    from db.tenants import KEY_PREFIX, revoke_key

    given = key_id.strip()
    # A leaked key an operator holds is taken as it is (matched by its hash): no look-up of its id first.
    if not given.isdigit() and not given.startswith(KEY_PREFIX):
        raise CliError(f"{given[:40]!r} is not a key id: give the number `lmbatch keys list` shows")
    with database_session(ctx) as session:
        revoked = revoke_key(session, key_id=int(given)) if given.isdigit() else revoke_key(session, key=given)
    if not revoked:
        raise CliError("no live key matches (unknown, or already revoked)")
    out.print("key revoked")


# ------------------------------------------------------------------------------------------------- tenants

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from `500M`, `10G`, `1T` or a plain number (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text.upper())
    if match is None:
        raise CliError(f"{text!r} is not a size: give bytes, or a number with K, M, G or T (e.g. 10G)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


@tenants_app.command("list")
def tenants_list(ctx: typer.Context) -> None:
    """Every tenant: its namespace, the limits it works under (an override marked *) and what it stores."""
    from db.tenant_limits import LIMIT_NAMES, all_tenants, limits_of, stored_bytes

    settings = settings_of(ctx)
    table = Table(box=None, pad_edge=False)
    headings = ("REQUESTS/S", "QUEUED ITEMS", "STORED BYTES", "WEIGHT", "RUNNING SHARDS", "FINE-TUNES")
    for column in ("TENANT", "NAMESPACE", *headings, "STORES"):
        table.add_column(column, no_wrap=True)
    with database_session(ctx) as session:
        for tenant in all_tenants(session):
            limits = limits_of(tenant, settings)
            shown = [
                f"{getattr(limits, name)}{'*' if getattr(tenant, name) is not None else ''}" for name in LIMIT_NAMES
            ]
            table.add_row(tenant.name, tenant.namespace, *shown, str(stored_bytes(session, tenant_id=tenant.id)))
    show(table)
    out.print("* set for this tenant (`lmbatch tenants set`); the others are the deployment's settings; 0: no limit")


@tenants_app.command("set")
def tenants_set(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="The tenant's name.")],
    max_requests_per_second: Annotated[
        int | None, typer.Option(min=0, help="API requests per second (0: no limit).")
    ] = None,
    max_queued_items: Annotated[int | None, typer.Option(min=1, help="Unfinished items at once.")] = None,
    max_stored_bytes: Annotated[
        str | None, typer.Option(help="Files and own model versions, e.g. 50G (0: no limit).")
    ] = None,
    weight: Annotated[
        float | None, typer.Option(min=0.001, max=1000, help="Share of a queue's workers against other tenants.")
    ] = None,
    max_running_shards: Annotated[
        int | None, typer.Option(min=0, help="Shards dispatched or running at once (0: no limit).")
    ] = None,
    max_concurrent_finetunes: Annotated[
        int | None, typer.Option(min=0, help="Fine-tunes dispatched or running at once (0: no limit).")
    ] = None,
    reset: Annotated[
        list[str] | None,
        typer.Option(help="Back to the deployment's setting: max-requests-per-second, max-queued-items, …"),
    ] = None,
) -> None:
    """Override limits for one tenant (the rest keep the deployment's settings)."""
    from db.tenant_limits import set_overrides

    values: dict[str, float] = {}
    if max_requests_per_second is not None:
        values["max_requests_per_second"] = max_requests_per_second
    if max_queued_items is not None:
        values["max_queued_items"] = max_queued_items
    if max_stored_bytes is not None:
        values["max_stored_bytes"] = parse_size(max_stored_bytes)
    for name, value in (
        ("weight", weight),
        ("max_running_shards", max_running_shards),
        ("max_concurrent_finetunes", max_concurrent_finetunes),
    ):
        if value is not None:
            values[name] = value
    cleared = tuple(name.replace("-", "_") for name in reset or ())
    if not values and not cleared:
        raise CliError("nothing to set: give a limit option or --reset")
    with database_session(ctx) as session:
        try:
            found = set_overrides(session, tenant_name=tenant, values=values, reset=cleared)
        except ValueError as error:
            raise CliError(str(error)) from error
    if found is None:
        raise CliError(f"no tenant {tenant!r} (`lmbatch tenants list`)")
    changes = [f"{name}={value}" for name, value in values.items()] + [f"{name}=default" for name in cleared]
    out.print(f"tenant {tenant!r}: {', '.join(changes)}")
