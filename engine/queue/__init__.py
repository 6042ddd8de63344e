"""The durable job queue on PostgreSQL: hands on :class:`JobQueue` and its value types.

``jobqueue`` is the API, ``backend`` what a job is, the outcome rules and every statement (``queue.sql``),
``worker`` the asyncio runtime.
"""

from engine.queue.backend import (
    CLAIMS_BESIDE_CONNECTION,
    CLAIMS_CONNECTION,
    DEFAULT_SETTINGS,
    ERROR_TEXT_MAX,
    FAIR_KEY_MAX,
    HEARTBEAT_CONNECTION,
    LEASE_CAP_LEASES,
    LISTEN_CONNECTION,
    OUTCOMES_CONNECTION,
    STATES,
    Abort,
    Counters,
    Handler,
    HandlerTimeout,
    Job,
    JobInfo,
    QueueSettings,
    Retry,
    StaleAttempt,
    backoff,
    error_text,
)
from engine.queue.jobqueue import JobQueue
from engine.queue.worker import WorkerFailed, step_aside, step_in

__all__ = [
    "CLAIMS_BESIDE_CONNECTION",
    "CLAIMS_CONNECTION",
    "DEFAULT_SETTINGS",
    "ERROR_TEXT_MAX",
    "FAIR_KEY_MAX",
    "HEARTBEAT_CONNECTION",
    "LEASE_CAP_LEASES",
    "LISTEN_CONNECTION",
    "OUTCOMES_CONNECTION",
    "STATES",
    "Abort",
    "Counters",
    "Handler",
    "HandlerTimeout",
    "Job",
    "JobInfo",
    "JobQueue",
    "QueueSettings",
    "Retry",
    "StaleAttempt",
    "WorkerFailed",
    "backoff",
    "error_text",
    "step_aside",
    "step_in",
]
