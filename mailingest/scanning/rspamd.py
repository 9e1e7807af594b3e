"""
A client of rspamd's normal worker: the raw message posted to C{/checkv2}
with what rspamd scores better with (client IP, HELO, MAIL FROM,
recipients) and the sender checks we already did, in the request headers
rspamd's C{http_headers} module reads (C{SPF}, C{DKIM}, C{DMARC}), so it
does not repeat them against DNS.

Every failure (refused, slow, not JSON, an answer without a score) is an
C{error} verdict with the reason, within the time given.
"""

import ipaddress
import json
from dataclasses import asdict, dataclass, field

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

# rspamd's answer is a page of JSON; a longer one is not rspamd's.
REPLY_LIMIT = 1024 * 1024
SYMBOLS_KEPT = 50


@dataclass(frozen=True)
class SpamVerdict:
    """rspamd's C{action}, C{score}, C{required_score} and the symbols it matched; C{error} with C{detail} when it could not say."""

    action: str
    score: float | None = None
    required: float | None = None
    symbols: tuple[str, ...] = field(default=())
    detail: str | None = None

    @property
    def error(self) -> bool:
        return self.action == "error"

    def to_json(self) -> dict:
        """As the scan process sends it to the daemon."""
        return {**asdict(self), "symbols": list(self.symbols)}

    @classmethod
    def from_json(cls, data: dict) -> "SpamVerdict":
        return cls(**{**data, "symbols": tuple(data["symbols"])})


def parse_reply(body: bytes) -> SpamVerdict:
    """rspamd's JSON answer, checked: the fields we keep, or an C{error} verdict."""
    try:
        reply = json.loads(body)
        action, score, required = reply["action"], float(reply["score"]), float(reply["required_score"])
        if not isinstance(action, str) or not action:
            raise ValueError("no action")
    except (ValueError, KeyError, TypeError) as e:
        return SpamVerdict("error", detail=f"rspamd answered garbage ({type(e).__name__}: {str(e)[:80]})")
    symbols = reply.get("symbols") or {}
    named = sorted(
        ((name, float((value or {}).get("score") or 0)) for name, value in symbols.items() if isinstance(value, dict)),
        key=lambda item: -abs(item[1]),
    )[:SYMBOLS_KEPT]
    return SpamVerdict(action[:40], score, required, tuple(f"{name}({value:g})" for name, value in named))


# What L{request_headers} reads of a message row (all the scan process is sent of it).
MESSAGE_FIELDS = ("id", "mail_from", "rcpt_to", "helo", "client_ip")


def request_headers(message: dict, sender_verdicts: dict | None, hostname: str) -> dict[str, list[str]]:
    """The C{/checkv2} request headers for C{message} (an C{inbound_message} row)."""
    headers = {
        "From": [message["mail_from"] or "<>"],
        "Rcpt": [rcpt for rcpt in message["rcpt_to"].split(", ") if rcpt],
        "Helo": [message.get("helo") or ""],
        "Queue-Id": [str(message["id"])],
        "MTA-Name": [hostname],
    }
    if message.get("client_ip"):
        headers["IP"] = [message["client_ip"]]
    verdicts = sender_verdicts or {}
    if verdicts.get("spf"):
        headers["SPF"] = [json.dumps({"result": verdicts["spf"], "domain": verdicts.get("spf_domain")})]
    if verdicts.get("dkim"):
        result = {"result": verdicts["dkim"], "domain": verdicts.get("dkim_domain") or "unknown"}
        headers["DKIM"] = [json.dumps({"results": [result]})]
    if verdicts.get("dmarc") and verdicts["dmarc"] in ("pass", "fail", "none"):
        dmarc = {"pass": "pass", "fail": "reject" if verdicts.get("dmarc_policy") == "reject" else "quarantine", "none": "na"}
        headers["DMARC"] = [json.dumps({"result": dmarc[verdicts["dmarc"]], "domain": verdicts.get("dmarc_domain")})]
    return {name: [value.replace("\r", " ").replace("\n", " ") for value in values] for name, values in headers.items()}


class RspamdClient:
    """Asks rspamd at C{url} (C{--rspamd}) for the spam verdict of a raw message."""

    def __init__(self, url: str, hostname: str, agent: IAgent | None = None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.url = url.rstrip("/")
        self.hostname = hostname
        if agent is None:
            # rspamd closes each connection after its answer (Connection: close even to a keep-alive
            # request; tests.test_scanning checks it), so a persistent pool would keep none.
            agent = Agent.usingEndpointFactory(reactor, _LiteralEndpoints(reactor), HTTPConnectionPool(reactor, persistent=False))
        self._http = HTTPClient(agent)

    async def check(self, raw_path: str, message: dict, sender_verdicts: dict | None, timeout: float) -> SpamVerdict:
        """rspamd's verdict on the raw message at C{raw_path}, within C{timeout} seconds."""
        if timeout <= 0:
            return SpamVerdict("error", detail="not scanned: the message's scan budget was spent")
        deadline = defer.Deferred()
        timer = self._reactor.callLater(timeout, deadline.callback, None)
        try:
            asking = defer.ensureDeferred(self._ask(raw_path, message, sender_verdicts))
            first, index = await defer.DeferredList(
                [asking, deadline], fireOnOneCallback=True, fireOnOneErrback=True, consumeErrors=True
            )
        finally:
            if timer.active():
                timer.cancel()
        if index == 1:
            asking.cancel()
            return SpamVerdict("error", detail=f"rspamd did not answer within {timeout:.2g} s")
        return first

    async def _ask(self, raw_path: str, message: dict, sender_verdicts: dict | None) -> SpamVerdict:
        try:
            with open(raw_path, "rb") as raw:
                response = await self._http.post(
                    self.url + "/checkv2", data=raw, headers=request_headers(message, sender_verdicts, self.hostname),
                )
                if response.code != 200:
                    text = (await response.content())[:200].decode("utf-8", "replace")
                    return SpamVerdict("error", detail=f"rspamd answered HTTP {response.code}: {text}")
                if (response.length or 0) > REPLY_LIMIT:
                    return SpamVerdict("error", detail=f"rspamd answered garbage ({response.length} bytes)")
                body = await _bounded(response)
        except defer.CancelledError:
            raise
        except _TooLong:
            return SpamVerdict("error", detail=f"rspamd answered garbage (over {REPLY_LIMIT} bytes)")
        except Exception as e:
            return SpamVerdict("error", detail=f"cannot ask rspamd at {self.url}: {type(e).__name__}: {str(e)[:200]}")
        return parse_reply(body)


@implementer(IAgentEndpointFactory)
class _LiteralEndpoints:
    """
    An address as the host (rspamd beside the daemon) is connected to as it
    is: Agent's own endpoints resolve even an address in a thread, a thread
    hop per message.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._names = Agent(reactor)._endpointFactory

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii").strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return self._names.endpointForURI(uri)
        if uri.scheme != b"http":
            return self._names.endpointForURI(uri)
        endpoint = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
        return endpoint(self._reactor, host, uri.port)


class _TooLong(Exception):
    pass


async def _bounded(response) -> bytes:
    """The body, refused past L{REPLY_LIMIT} (a chunked answer has no length to check first)."""
    parts: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > REPLY_LIMIT:
            raise _TooLong()
        parts.append(data)

    await treq.collect(response, collect)
    return b"".join(parts)
