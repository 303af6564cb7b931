"""Every error millpond raises on purpose, in one place, so users can catch them by family."""

from __future__ import annotations


class MillpondError(Exception):
    """Base of every error millpond raises on purpose."""


class ConfigurationError(MillpondError):
    """A setting has a wrong value, or the settings cannot be read."""


class PluginNotFound(MillpondError):
    """The configured pool or broker is not installed."""


class PluginLoadError(MillpondError):
    """A plugin is installed but cannot be imported or does not fit this core."""


class MessageError(MillpondError):
    """A message cannot be turned into a task: it is dead-lettered, never retried."""


class UnsupportedContentType(MessageError):
    """The message's content type is not in the accepted list (pickle is refused by default)."""


class MalformedMessage(MessageError):
    """The message does not follow Celery's message protocol v2."""


class MessageTooLarge(MessageError):
    """The message body is larger than the `max_message_size` setting allows."""


class SignatureError(MessageError):
    """The message is unsigned or its signature does not match (only when signing is required)."""


class UnknownTask(MessageError):
    """No task of that name is registered in the worker's app."""


class BrokerError(MillpondError):
    """The broker could not do what was asked (after its bounded retries)."""


class PublishError(BrokerError):
    """A message could not be handed to the broker: the producer must not assume it was sent."""

    #: of a batch (`Broker.publish_many`) taken in part, the task ids not taken; None: unknown
    not_sent: frozenset[str] | None = None


class AccessDenied(BrokerError):
    """The broker refused the credentials, virtual host or a permission (Redis WRONGPASS, NOAUTH,
    NOPERM; AMQP ACCESS_REFUSED, NOT_ALLOWED): waiting cannot cure it, so it is never retried."""


class PublishAccessDenied(AccessDenied, PublishError):
    """A publish refused for credentials or permissions: nothing was sent."""


class BackendError(MillpondError):
    """The result backend could not store or fetch a result."""


class TimeoutError(MillpondError):
    """`AsyncResult.get` waited longer than its timeout."""


class Retry(MillpondError):
    """Raised inside a task to ask for it to run again later; carries when."""

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: float | None = None,
        max_retries: int | None = None,
    ) -> None:
        super().__init__(message or (f"Retry in {countdown}s: {exc!r}" if exc else "Retry"))
        self.exc, self.countdown, self.eta, self.max_retries = exc, countdown, eta, max_retries


class Reject(MillpondError):
    """Raised inside a task to reject its message (dead-letter it, or requeue it if asked)."""

    def __init__(self, reason: str = "", requeue: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.requeue = reason, requeue


class MaxRetriesExceededError(MillpondError):
    """A task asked to retry more often than its `max_retries` allows."""


class TaskError(MillpondError):
    """A task failed with an exception type the caller cannot rebuild: `.get()` raises a subclass
    named after the remote type, carrying its module and message."""

    exc_type: str = "TaskError"
    exc_module: str = ""


class TimeLimitExceeded(MillpondError):
    """The task ran past its hard time limit and was stopped."""


class SoftTimeLimitExceeded(MillpondError):
    """Raised inside a task when it passes its soft time limit; the task may catch it and clean up."""


class WorkerLostError(MillpondError):
    """The process or thread running the task died before reporting back."""


class TaskRevokedError(MillpondError):
    """The task was not run: it expired, or it was terminated."""


class NotSupported(MillpondError):
    """The broker, result backend or pool does not have the capability that was asked of it."""


class ChordError(MillpondError):
    """A task in a chord's header failed, so its body did not run (stored as the body's error)."""
