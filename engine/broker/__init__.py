"""BROKER credentials: master keys that mint, rotate and delete sub-account keys (issue 15).

``settings`` (the rotation policy and grace periods), ``labels`` (how the engine marks its keys at a venue),
``payloads`` (the job kinds), ``discovery`` (a BROKER verification finds its sub-accounts), ``minting``,
``rotation``, ``reconcile`` and ``service`` (the parts wired together). Import the modules.
"""

__all__ = ()  # nothing handed on: import the modules (engine.broker.service, ...)
