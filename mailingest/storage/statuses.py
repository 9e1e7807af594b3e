"""The statuses of messages and webhook events: a module of its own so the admin command's parser needs nothing more."""

EVENT_STATUSES = ("pending", "delivered", "dead")
MESSAGE_STATUSES = ("received", "parsed", "failed", "quarantined", "incinerated")
