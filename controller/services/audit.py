"""The audit log: who did what, when, with what outcome. Appended to, never changed (the database
refuses UPDATE and DELETE on it, migration 0004)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controller.domain.clock import Clock, rfc3339
from controller.services.auth import Principal
from controller.store.models import AuditRow

MAX_PAGE = 1000


class AuditLog:
    def __init__(self, engine: Engine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock

    def entry(
        self,
        principal: Principal | None,
        action: str,
        *,
        subject: str | None = None,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
        remote: str | None = None,
    ) -> AuditRow:
        """A row to add in the caller's own transaction, so the fact and its audit commit together."""
        return AuditRow(
            at=self._clock.now(),
            key_id=principal.key_id if principal else None,
            key_name=principal.name if principal else None,
            role=principal.role.value if principal else None,
            action=action,
            subject=subject,
            outcome=outcome,
            detail=detail or {},
            remote=remote,
        )

    def record(
        self,
        principal: Principal | None,
        action: str,
        *,
        subject: str | None = None,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
        remote: str | None = None,
    ) -> None:
        with Session(self._engine) as session:
            session.add(
                self.entry(principal, action, subject=subject, outcome=outcome, detail=detail, remote=remote)
            )
            session.commit()

    def read(
        self,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        action: str | None = None,
        subject: str | None = None,
        key_id: str | None = None,
        after_id: int | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Entries in the order they were written, filtered; page with `after_id`."""
        query = select(AuditRow).order_by(col(AuditRow.id)).limit(min(max(limit, 1), MAX_PAGE))
        if start is not None:
            query = query.where(col(AuditRow.at) >= start)
        if end is not None:
            query = query.where(col(AuditRow.at) < end)
        if action is not None:
            query = query.where(AuditRow.action == action)
        if subject is not None:
            query = query.where(AuditRow.subject == subject)
        if key_id is not None:
            query = query.where(AuditRow.key_id == key_id)
        if after_id is not None:
            query = query.where(col(AuditRow.id) > after_id)
        with Session(self._engine) as session:
            rows = session.exec(query).all()
        return [
            {
                "id": row.id,
                "at": rfc3339(row.at),
                "key_id": row.key_id,
                "key_name": row.key_name,
                "role": row.role,
                "action": row.action,
                "subject": row.subject,
                "outcome": row.outcome,
                "detail": row.detail,
                "remote": row.remote,
            }
            for row in rows
        ]
