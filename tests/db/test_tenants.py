"""API keys: only a hash is stored; a revoked or expired key no longer authenticates; keys are listed without
their secrets and revoked by id."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import ApiKey, utcnow
from db.session import transaction
from db.tenants import authenticate, create_key, hash_key, issue_key, list_keys, revoke_key


def test_key_is_stored_only_as_a_hash_and_revocation_works(empty_db: sessionmaker[Session]) -> None:
    with transaction(empty_db) as session:
        key = create_key(session, tenant_name="acme")
    with empty_db() as session:
        stored = session.scalars(select(ApiKey)).all()
        assert len(stored) == 1
        assert stored[0].key_hash == hash_key(key)
        assert key not in {stored[0].key_hash, stored[0].prefix}
        principal = authenticate(session, key=key)
        assert principal is not None and principal.tenant_name == "acme" and not principal.is_admin
    with transaction(empty_db) as session:
        assert revoke_key(session, key=key)
        assert not revoke_key(session, key=key)
    with empty_db() as session:
        assert authenticate(session, key=key) is None
        assert authenticate(session, key="lmb_not-a-key") is None


def test_keys_are_listed_without_secrets_revoked_by_id_and_refused_once_expired(
    empty_db: sessionmaker[Session],
) -> None:
    # Given a live key, one that expired a minute ago and one that expires in a minute
    with transaction(empty_db) as session:
        live = issue_key(session, tenant_name="acme")
        expired = issue_key(session, tenant_name="acme", expires_at=utcnow() - timedelta(minutes=1))
        soon = issue_key(session, tenant_name="beta", scope="admin", expires_at=utcnow() + timedelta(minutes=1))
    with empty_db() as session:
        # Expect the expired one refused and the two others accepted
        assert authenticate(session, key=expired.key) is None
        assert authenticate(session, key=live.key) is not None and authenticate(session, key=soon.key) is not None
        # and every key listed, oldest first, with its tenant, scope, prefix and expiry, and nothing secret
        keys = list_keys(session)
        assert [(k.id, k.tenant, k.scope, k.prefix) for k in keys] == [
            (live.id, "acme", "tenant", live.key[:10]),
            (expired.id, "acme", "tenant", expired.key[:10]),
            (soon.id, "beta", "admin", soon.key[:10]),
        ]
        assert keys[0].expires_at is None and keys[2].expires_at is not None and keys[2].expires_at > utcnow()
        assert live.key not in repr(keys) and hash_key(live.key) not in repr(keys)
        assert [k.id for k in list_keys(session, tenant_name="beta")] == [soon.id]
    # When the live key is revoked by its id
    with transaction(empty_db) as session:
        assert revoke_key(session, key_id=live.id)
        assert not revoke_key(session, key_id=live.id)
        assert not revoke_key(session, key_id=10**9)
    # Expect it refused, listed as revoked, and the other keys untouched
    with empty_db() as session:
        assert authenticate(session, key=live.key) is None
        assert [k.revoked_at is not None for k in list_keys(session)] == [True, False, False]
