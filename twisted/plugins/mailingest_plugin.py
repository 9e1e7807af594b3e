"""twistd plugin registration: makes ``twistd mailingest`` available."""

from twisted.application.service import ServiceMaker

mailingest = ServiceMaker(
    "mailingest",
    "mailingest.app.tap",
    "SMTP ingest daemon: keeps business mail and extracts attachments",
    "mailingest",
)
