"""The async-inference worker: `engine` (watch, call, put the result, commit), `handler` (loading
and calling a user's handler) and `cli` (`qserve worker`). A handler module imports `Retryable`
from here to ask for a retry.
"""

from qserve.worker.handler import Retryable

__all__ = ["Retryable"]
