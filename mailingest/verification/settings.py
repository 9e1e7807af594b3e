"""How the daemon asks the sender check process for a message's checks."""

from dataclasses import dataclass

from mailingest.verification.resolver import DEFAULT_BUDGET_SECONDS


@dataclass(frozen=True)
class CheckSettings:
    """
    C{authserv_id} names us in C{Authentication-Results} (the daemon's
    C{--hostname}); C{resolver} is C{--dns-resolver} as (host, port), None
    for the system's; C{budget} is C{--dns-budget}, the DNS time one message may take.
    """

    authserv_id: str
    resolver: tuple[str, int] | None = None
    budget: float = DEFAULT_BUDGET_SECONDS

    def request(self, message: dict, raw_path: str) -> dict:
        """The worker's request for C{message} (an C{inbound_message} row) stored at C{raw_path}."""
        return {
            "raw_path": raw_path,
            "client_ip": message.get("client_ip"),
            "helo": message.get("helo") or "",
            "mail_from": message["mail_from"],
            "authserv_id": self.authserv_id,
            "resolver": list(self.resolver) if self.resolver else None,
            "budget": self.budget,
        }
