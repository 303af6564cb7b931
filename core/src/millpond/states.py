"""Task states: one `StrEnum` for what a result store records and how a job ended. The values are
Celery's state names, so a state written by either side reads the same on the other."""

from enum import StrEnum


class TaskState(StrEnum):
    #: nothing is known about the task (not received yet, or its result expired)
    PENDING = "PENDING"
    RECEIVED = "RECEIVED"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    #: it will run again (a new message is on its way)
    RETRY = "RETRY"
    #: not run: revoked, terminated on request, or expired before it started
    REVOKED = "REVOKED"
    #: the task raised `Reject`: its message was dead-lettered or requeued
    REJECTED = "REJECTED"
    #: outcome only: the execution unit died (a child killed, out of memory)
    LOST = "LOST"
    #: outcome only: the task ran past its hard time limit and was stopped
    TIMEOUT = "TIMEOUT"


#: states after which a task's result will not change
READY_STATES = frozenset({TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED})
#: outcomes that count as the task failing, all stored as FAILURE with their exception
FAILED_STATES = frozenset({TaskState.FAILURE, TaskState.LOST, TaskState.TIMEOUT})
