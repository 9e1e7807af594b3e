"""
The bench's DNS server: the load's sender domain with SPF and DMARC records,
answered at once from 127.0.0.1, so the daemon's sender checks measure their
own cost rather than a resolver's. Prints its port, then serves until killed.

    python -m bench.dns_stub
"""

from twisted.internet import reactor

from bench.targets import DOMAIN
from tests.dns_server import DnsServer, Zone, txt


def main() -> None:
    zone = Zone(
        {DOMAIN: [txt("v=spf1 ip4:127.0.0.1 -all")], f"_dmarc.{DOMAIN}": [txt("v=DMARC1; p=none")]},
        origin=DOMAIN,
    )
    _, port = DnsServer(zone).start()
    print(port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
