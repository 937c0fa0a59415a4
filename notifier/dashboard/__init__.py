"""The web dashboard on the operations listener: overview, job search, retry and cancel."""

from notifier.dashboard.app import Dashboard

__all__ = ["Dashboard"]
