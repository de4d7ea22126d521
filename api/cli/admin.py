"""``lmbatch db upgrade`` and ``lmbatch keys create | revoke``: what an operator does to the database directly.

Unlike the client commands (api/cli/jobs.py, api/cli/models.py) these open the database named by the settings
(``LMBATCH_DATABASE_URL``), so they run on a host that reaches it, and an API key is made here before any
request can carry one. SQLAlchemy, the migrations and the built-in models are imported inside the commands:
``lmbatch --help`` stays instant.
"""

from __future__ import annotations

from typing import Annotated

import typer

from api.cli.common import CliError, out, settings_of

admin_app = typer.Typer()  # merged into the root app: `lmbatch db …` and `lmbatch keys …`
db_app = typer.Typer(help="The SQL database: schema and built-in models.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of tenants.", no_args_is_help=True)
admin_app.add_typer(db_app, name="db")
admin_app.add_typer(keys_app, name="keys")


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


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant name; created if new.")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (manages models for every tenant).")] = False,
) -> None:
    """Make an API key. It is printed once, as the last line; only its sha256 is stored."""
    from db.session import make_engine, make_session_factory, transaction
    from db.tenants import create_key

    if not tenant.strip():
        raise CliError("--tenant must not be empty")
    engine = make_engine(settings_of(ctx))
    try:
        with transaction(make_session_factory(engine)) as session:
            key = create_key(session, tenant_name=tenant.strip(), scope="admin" if admin else "tenant")
    finally:
        engine.dispose()
    out.print(f"created {'an admin' if admin else 'a tenant'} key for tenant {tenant.strip()!r} (shown only now):")
    typer.echo(key)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key: Annotated[str, typer.Argument(help="The key to revoke.")]) -> None:
    """Revoke a key: requests that carry it are refused from now on."""
    from db.session import make_engine, make_session_factory, transaction
    from db.tenants import revoke_key

    engine = make_engine(settings_of(ctx))
    try:
        with transaction(make_session_factory(engine)) as session:
            revoked = revoke_key(session, key=key.strip())
    finally:
        engine.dispose()
    if not revoked:
        raise CliError("no live key matches (unknown, or already revoked)")
    out.print("key revoked")
