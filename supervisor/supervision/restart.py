"""Restart policy: exponential backoff and the intensity window that quarantines.

Like an OTP supervisor's intensity/period: more than ``max_restarts`` crashes
within ``restart_window`` seconds and the module is given up on (FAILED) until an
operator restarts it. Between restarts the delay doubles from ``restart_delay`` up
to ``restart_delay_max``, and resets once a worker has stayed up ``stable_after``.
"""

import collections


class RestartPolicy:
    def __init__(self, options):
        self.max_restarts = options["max_restarts"]
        self.window = options["restart_window"]
        self.base_delay = options["restart_delay"]
        self.max_delay = options["restart_delay_max"]
        self.stable_after = options["stable_after"]
        self._crashes = collections.deque()
        self._next_delay = self.base_delay

    def on_crash(self, now, uptime):
        """Seconds to wait before restarting after a crash at ``now``, or None to quarantine."""
        if uptime is not None and uptime >= self.stable_after:
            self._next_delay = self.base_delay
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.window:
            self._crashes.popleft()
        if len(self._crashes) > self.max_restarts:
            return None
        delay = self._next_delay
        self._next_delay = min(max(delay * 2, self.base_delay), self.max_delay)
        return delay

    def reset(self):
        """Forget past crashes (an operator asked for this restart)."""
        self._crashes.clear()
        self._next_delay = self.base_delay
