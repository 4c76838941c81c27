"""The trackers moved to `spmoe.tracking`; run.py still imports them from here until it imports that module."""

from spmoe.tracking import NullTracker, WandbTracker, log_run, make_tracker

__all__ = ["NullTracker", "WandbTracker", "log_run", "make_tracker"]
