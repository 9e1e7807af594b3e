"""The checks an organisation's sender policy can require: a module of its own so the admin command's parser needs nothing more."""

REQUIREMENTS = ("none", "spf", "dkim", "dmarc")
