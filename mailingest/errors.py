"""Errors that cross module boundaries; each says what went wrong in one line."""


class MailingestError(Exception):
    """Base class: str(error) is a message fit for a user."""


class ConfigError(MailingestError):
    """An option or configuration file is wrong."""


class OrgExists(MailingestError):
    """An organisation with this slug already exists."""


class NoSuchOrg(MailingestError):
    """No organisation has this slug."""


class NoSuchMessage(MailingestError):
    """No inbound message has this id."""


class BlobNotFound(MailingestError):
    """Object storage holds nothing under this key."""


class StorageError(MailingestError):
    """Object storage failed; the operation may succeed if retried later."""


class NotQuarantined(MailingestError):
    """C{release} of a message that is not quarantined."""


class NoSuchEvent(MailingestError):
    """No webhook event has this id."""


class MessageHeld(MailingestError):
    """A delete (retention or erasure) of a message under a legal hold."""


class NotErasable(MailingestError):
    """An erasure or reprocess the message's state does not allow (still being processed, already erased, content gone)."""


class NoSuchHold(MailingestError):
    """No legal hold has this id (or it was removed already)."""


class ContentGone(MailingestError):
    """The message's raw copy or documents were deleted by retention or erasure: only the tombstone is left."""


class DomainTaken(MailingestError):
    """The domain (in any of its forms) is already an organisation's."""


class NoSuchDomain(MailingestError):
    """No organisation has this domain."""
