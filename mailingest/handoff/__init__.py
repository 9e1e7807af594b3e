"""
Handing messages to the application: signed webhooks from a durable outbox
(L{mailingest.handoff.webhooks}) and the read-only JSON API
(L{mailingest.handoff.api}). Imports point down, to storage, ops and errors.
"""
