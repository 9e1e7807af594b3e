"""
All the sender checks of one message, as the sender check process runs them: SPF,
DKIM, ARC, then DMARC from their results, within one DNS time budget.
"""

from mailingest.verification.dkim_check import check_arc, check_dkim, read_message
from mailingest.verification.dkim_reading import forget_body
from mailingest.verification.dmarc import check_dmarc
from mailingest.verification.resolver import BudgetResolver, NotCached
from mailingest.verification.results import Verdicts, authentication_results
from mailingest.verification.spf_check import check_spf


def verify_message(
    message: bytes,
    peer: str | None,
    helo: str,
    mail_from: str,
    authserv_id: str,
    resolver_address: tuple[str, int] | None,
    budget: float,
    cached_only: bool = False,
) -> Verdicts:
    """
    The verdicts of C{message}; with C{cached_only}, from DNS answers already
    cached, or L{NotCached} when one was missing (nothing was sent).
    """
    resolver = BudgetResolver(resolver_address, budget, cached_only=cached_only)
    spf = check_spf(peer, mail_from, helo, resolver)
    verifier = read_message(message)
    try:
        dkim, signatures = check_dkim(verifier, resolver)
        arc = check_arc(verifier, resolver)
        dmarc, policy = check_dmarc(verifier, spf, signatures, resolver)
    finally:
        forget_body()  # the canonical body kept for the message's next signature
    if resolver.missed:
        raise NotCached()
    verdicts = Verdicts(
        spf=spf,
        dkim=dkim,
        dmarc=dmarc,
        arc=arc,
        signatures=signatures,
        mail_from=mail_from,
        helo=helo,
        header_from=dmarc.domain,
        dmarc_policy=policy,
    )
    verdicts.authentication_results = authentication_results(authserv_id, verdicts)
    return verdicts
