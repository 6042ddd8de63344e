"""What keeps use bounded: per-owner quotas (``quotas``, with ``tenants.sql``), per-IP venue budgets shared by
an egress group (``budgets``), and the retention purge of growing tables (``retention``). Import the modules."""

__all__ = ()  # nothing handed on: import the modules (engine.bounds.quotas, .budgets, .retention)
