"""API keys: only a hash is stored; a revoked key no longer authenticates."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import ApiKey
from db.session import transaction
from db.tenants import authenticate, create_key, hash_key, revoke_key


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
