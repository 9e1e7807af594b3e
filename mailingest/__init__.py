"""mailingest: an SMTP daemon that keeps inbound business mail and extracts its attachments."""

__version__ = "0.1.0"
