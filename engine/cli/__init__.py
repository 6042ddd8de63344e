"""``credential-engine``: run the service, and operate on credentials from a shell.

    credential-engine serve [--sandbox]          API + workers (sandbox: simulator with test accounts)
    credential-engine worker                     queue workers only (scale out)
    credential-engine simulator [...]            the exchange simulator alone
    credential-engine token --owner ID [--scope S] a development bearer token (needs ENGINE_API_JWT_SECRET)
    credential-engine create|list|get|verify|rotate|revoke ...       one command per lifecycle operation
    credential-engine mint BROKER_ID --sub-account S ...              a sub-account key minted through a BROKER key
    credential-engine rotate ID --automatic       a minted credential: the engine mints its new key itself
    credential-engine reconcile-keys             delete venue keys labelled by the engine that nothing holds
    credential-engine connect|disconnect|accounts ...                trading accounts
    credential-engine webhooks add|list|remove|rotate-secret|deliveries ...
    credential-engine jobs list|retry ...        dead jobs and their retry
    credential-engine rewrap-keys                re-wrap data keys under the current master key (1: some left)
    credential-engine keys encrypt --kms-key-id ID   a master keyring encrypted by AWS KMS (ENGINE_MASTER_KEYS_KMS)
    credential-engine migrate                    apply the schema

Lifecycle commands talk to the database directly (``EngineConfig.from_env()``, the service's environment),
acting for ``--owner`` (or ``ENGINE_OWNER``). Secrets never go on the command line: ``--api-secret-file``
(``-`` for stdin), ``ENGINE_CLI_API_SECRET``, or a prompt. Tables by default, ``--json`` for scripts.

Exit status: 0 done; 1 the operation failed (not found, conflict, a verification that failed, ...);
2 bad usage, invalid input or a bad setting (a ``ConfigurationError``, naming the variable); 130
interrupted. Errors are one line on stderr, never a traceback.
"""

from engine.cli.main import main
from engine.cli.parser import build_parser

__all__ = ["build_parser", "main"]
