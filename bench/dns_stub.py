"""
The bench's DNS server: the load's sender domain with SPF and DMARC records,
answered at once from 127.0.0.1, so the daemon's sender checks measure their
own cost rather than a resolver's. Prints its port, then serves until killed.
Names in or under a C{--silent-zone} domain are never answered; with
C{--dkim-key}, that record is the key of selector C{sel} of the domain.

    python -m bench.dns_stub [--silent-zone DOMAIN ...] [--dkim-key RECORD]
"""

import argparse

from twisted.internet import reactor

from bench.targets import DOMAIN
from tests.dns_server import DnsServer, Zone, txt


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_stub")
    parser.add_argument("--silent-zone", action="append", default=[], metavar="DOMAIN")
    parser.add_argument("--dkim-key", metavar="RECORD")
    args = parser.parse_args()
    records = {DOMAIN: [txt("v=spf1 ip4:127.0.0.1 -all")], f"_dmarc.{DOMAIN}": [txt("v=DMARC1; p=none")]}
    if args.dkim_key:
        records[f"sel._domainkey.{DOMAIN}"] = [txt(args.dkim_key)]
    zone = Zone(
        records,
        origin=DOMAIN,
        silent_zones=args.silent_zone,
    )
    _, port = DnsServer(zone).start()
    print(port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
