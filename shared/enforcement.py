"""Protective rules that an operator can first watch, then enforce (``HERALD_OBSERVE_ONLY``).

A rule in observe-only mode still checks: where it would refuse, it counts
(``herald_observe_only_total{rule}``) and logs a warning (throttled to one line per
rule every 10 s, with how many were left out), and lets the request or file through.
Rolling a new limit out is then: deploy observe-only, watch the counter for a day or
two against real traffic, raise the limit if it fires where it should not, enforce.
"""

from __future__ import annotations

import logging

from shared.logcontext import Throttle
from shared.metrics import Metrics
from shared.settings import OBSERVABLE_RULES

logger = logging.getLogger(__name__)

SSE_LIMITS = "sse_limits"
QUEUE_CAPS = "queue_caps"
ORPHAN_DELETION = "orphan_deletion"
assert set(OBSERVABLE_RULES) == {SSE_LIMITS, QUEUE_CAPS, ORPHAN_DELETION}

LOG_EVERY_S = 10.0


class Enforcement:
    """Answers "act on this rule now?" (refuse the stream, the delayed message; delete
    the orphan); an observe-only rule counts, logs and says no."""

    def __init__(self, observed: frozenset[str], metrics: Metrics) -> None:
        self.observed = observed
        self.metrics = metrics
        self._throttle = Throttle(LOG_EVERY_S)

    def enforces(self, rule: str, what: str, count: int = 1, *, again: bool = False) -> bool:
        """True: enforce it. False (observe-only): it was counted and logged, and the
        caller goes on as if the rule had let it through. ``again``: a second check of
        a case already counted (not counted or logged twice)."""
        if rule not in self.observed:
            return True
        if again:
            return False
        self.metrics.observe_only.labels(rule).inc(count)
        left_out = self._throttle.allow(rule)
        if left_out is not None:
            more = f" (and {left_out} more since the last line)" if left_out else ""
            logger.warning("observe-only %s: would have refused: %s%s", rule, what, more)
        return False
