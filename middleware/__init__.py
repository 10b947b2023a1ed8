"""The reliability stack: composable middleware around one model call, usable in any asyncio service.

``Stack([Route(...), Fallback(...), Retry(), CircuitBreaker(), Timeout()], terminal)`` — the first
middleware listed runs outermost. Nothing here imports FastStream or the ``handlers`` package.
"""

from stanchion.middleware.breaker import BreakerPolicy, CircuitBreaker
from stanchion.middleware.breaker_store import (
    BreakerRecord,
    BreakerState,
    BreakerStore,
    InMemoryBreakerStore,
    ProbeLease,
    RecordListener,
    SharedBreakerStore,
)
from stanchion.middleware.bulkhead import Bulkhead
from stanchion.middleware.call import Call, Candidate
from stanchion.middleware.clock import SYSTEM_CLOCK, Clock, FakeClock, SystemClock
from stanchion.middleware.errors import (
    AllCandidatesFailed,
    AttemptTimeout,
    CircuitOpenError,
    DeadlineExceeded,
    FailureKind,
    InvalidOutput,
    NoCandidates,
    StanchionError,
    describe,
    failure_kind,
    is_invalid_output,
    is_transient,
    wait_hint,
)
from stanchion.middleware.fallback import Fallback
from stanchion.middleware.observe import AttemptRecord, AttemptRecorder, Observe
from stanchion.middleware.retry import Retry, RetryPolicy, stop_at_deadline, wait_retry_after
from stanchion.middleware.route import Route, RouteSpec, Rule
from stanchion.middleware.stack import Middleware, Next, Stack, Terminal
from stanchion.middleware.timeout import Timeout
from stanchion.middleware.tracing import Tracing

__all__ = [
    "SYSTEM_CLOCK",
    "AllCandidatesFailed",
    "AttemptRecord",
    "AttemptRecorder",
    "AttemptTimeout",
    "BreakerPolicy",
    "BreakerRecord",
    "BreakerState",
    "BreakerStore",
    "Bulkhead",
    "Call",
    "Candidate",
    "CircuitBreaker",
    "CircuitOpenError",
    "Clock",
    "DeadlineExceeded",
    "FailureKind",
    "FakeClock",
    "Fallback",
    "InMemoryBreakerStore",
    "InvalidOutput",
    "Middleware",
    "Next",
    "NoCandidates",
    "Observe",
    "ProbeLease",
    "RecordListener",
    "Retry",
    "RetryPolicy",
    "Route",
    "RouteSpec",
    "Rule",
    "SharedBreakerStore",
    "Stack",
    "StanchionError",
    "SystemClock",
    "Terminal",
    "Timeout",
    "Tracing",
    "describe",
    "failure_kind",
    "is_invalid_output",
    "is_transient",
    "stop_at_deadline",
    "wait_hint",
    "wait_retry_after",
]
