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


class DomainTaken(MailingestError):
    """The domain (in any of its forms) is already an organisation's."""


class NoSuchDomain(MailingestError):
    """No organisation has this domain."""
