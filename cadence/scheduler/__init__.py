"""Scheduled pushes: recurring campaign jobs, audience evaluation, and the background jobs.

- :mod:`cadence.scheduler.occurrences` - pure schedule arithmetic: when a campaign
  fires, in its zone or in each customer's, and what a restart owes (misfires).
- :mod:`cadence.scheduler.push` - one run: evaluate the audience in chunks, decide per
  customer with :func:`cadence.engine.decide.decide`, enqueue sends idempotently.
- :mod:`cadence.scheduler.service` - the runs table, claiming and resuming runs, and
  the APScheduler ``BackgroundScheduler`` inside ``cadence serve``.
"""

from __future__ import annotations
