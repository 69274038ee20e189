"""How soon a task may be back after a wait, by where it waits (facts about Airflow 3.3.2's timing)."""

from __future__ import annotations

from datetime import timedelta

#: With ``deferrable=False``, waits up to this long are slept in the running task by default.
#: A reschedule costs a new task process and a trip through the scheduler queue, and is never
#: due sooner than MIN_RESCHEDULE_DELAY, so shorter waits are cheaper slept. Measured with
#: ``make bench`` (60 requests at 1/s, 4 slots): 60 task launches instead of 135, no try
#: spent, makespan 57 s instead of 86 s.
DEFAULT_RESCHEDULE_IN_PROCESS_THRESHOLD = timedelta(seconds=5)
#: With ``deferrable=True`` (the default) nothing is slept in the task by default: a deferral
#: has a short minimum delay (min_defer_delay), and a task launch costs less slot time than
#: the waits it replaces (``make bench``: 0 slot-seconds waiting, half the busy slot time of
#: the 5 s threshold, for a makespan still within 1.25x of the ideal).
DEFAULT_DEFERRED_IN_PROCESS_THRESHOLD = timedelta(0)
#: A reschedule is never due sooner than this: one due within seconds can race the
#: executor's report of the run that asked for it, and Airflow 3.3.2 then counts a failed try
#: (apache/airflow#71172). The supervisor notices its task exited only at its next wake-up,
#: up to [workers] min_heartbeat_interval later, and the scheduler reads the report a loop
#: after that: 5 s was measured to be too short. Waiting longer than the server asked is
#: always allowed.
MIN_RESCHEDULE_DELAY = timedelta(seconds=10)


def default_in_process_threshold(deferrable: bool) -> timedelta:
    return DEFAULT_DEFERRED_IN_PROCESS_THRESHOLD if deferrable else DEFAULT_RESCHEDULE_IN_PROCESS_THRESHOLD


def min_defer_delay() -> timedelta:
    """The earliest a deferral may be due: [workers] min_heartbeat_interval from now.

    The scheduler forgives the executor's late report of the run that deferred while the
    task is back in ``scheduled`` or still queued in the executor ("resume-after-defer" in
    SchedulerJobRunner._process_executor_events), but not once the resumed run is running:
    then it counts a failed try, as for a reschedule (apache/airflow#71172). The report is
    late by up to the supervisor's heartbeat interval (it notices its task's exit at its next
    wake-up); the resumed run needs a triggerer loop and a scheduler loop before it can run,
    as the report needs a scheduler loop to be read. So a deferral due no sooner than that
    interval is reported before the task runs again. Deferrals due at once spent 3 tries in
    132 launches with the default 5 s heartbeat (make bench); this project's stacks use 1 s.

    Inside the triggerer there is no such race: a wait there ends on time.
    """
    try:
        from airflow.sdk.configuration import conf

        heartbeat = conf.getint("workers", "min_heartbeat_interval", fallback=5)
    except Exception:  # an SDK without that setting: assume Airflow's default
        heartbeat = 5
    return timedelta(seconds=max(heartbeat, 0))
