"""Recovery: end every stall in bounded time without losing pending work.

- :mod:`.extension`: the escalation ladder (preempt, requeue, close, exit);
- :mod:`.requeue`: requeue (bounded), quarantine, dead letters, where they are kept;
- :mod:`.exit`: the documented exit codes and the hard exit;
- :mod:`.middleware`: turns a cancelled transfer into its requeued copy.
"""

from .. import metakeys
from .exit import EXIT_BLOCKED_LOOP, EXIT_CLOSE_TIMEOUT, EXIT_CODES, hard_exit
from .extension import LEVELS, Recovery, recovery_for
from .middleware import RecoveryMiddleware
from .requeue import Requeuer, state_dir

REQUEUES_KEY = metakeys.REQUEUES
CANCELLED_KEY = metakeys.RECOVERY_CANCEL

__all__ = ["CANCELLED_KEY", "EXIT_BLOCKED_LOOP", "EXIT_CLOSE_TIMEOUT", "EXIT_CODES", "LEVELS",
           "REQUEUES_KEY", "Recovery", "RecoveryMiddleware", "Requeuer", "hard_exit",
           "recovery_for", "state_dir"]
