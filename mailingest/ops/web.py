"""
How the daemon's HTTP sites route (the ops endpoint, the API, the console):
one twisted.web resource tree each, walked by twisted.web's own getChild
traversal, a small resource per route.

Why a resource tree and not C{klein}: twisted.web already routes this way
(C{putChild}/C{getChild}) and already serves these sites; klein would add a
dependency (and werkzeug's) to put back a regex route table in one leaf
resource, the thing this replaces, and its 404/405 answers would still need
overriding to keep each site's own error bodies (the API's JSON codes, the
console's pages). Our routes are fixed segments and numeric ids, which a tree
says directly.
"""

import re
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web import resource, server

ID_SEGMENT = re.compile(rb"[0-9]{1,18}")  # ASCII digits only (str.isdigit takes "²"), an id a database integer holds


class Node(resource.Resource):
    """
    One path of a site, made per request with the site's shared state
    (C{site}, the root node) and the id its path names, if any. Below it:
    C{below}'s fixed segments, a numeric segment as C{item}, and anything else
    L{missing}. Its answer is the C{async def} L{answer}, run as a Deferred
    whose failure goes to L{failed}, so a slow backend holds only its request.
    """

    below: dict[bytes, type["Node"]] = {}
    item: type["Node"] | None = None

    def __init__(self, site: Any, id: int | None = None):
        super().__init__()
        self.site = site
        self.id = id

    def getChild(self, segment: bytes, request: server.Request) -> resource.IResource:
        if segment in self.below:
            return self.below[segment](self.site, self.id)
        if self.item is not None and ID_SEGMENT.fullmatch(segment):
            return self.item(self.site, int(segment))
        return self.missing()

    def missing(self) -> resource.IResource:
        """The site's answer to a path it does not have."""
        raise NotImplementedError

    def render(self, request: server.Request) -> int:
        d = Deferred.fromCoroutine(self.answer(request))
        d.addErrback(self.failed, request)
        return server.NOT_DONE_YET

    async def answer(self, request: server.Request) -> None:
        raise NotImplementedError

    def failed(self, failure: Failure, request: server.Request) -> None:
        """An answer that raised what its site does not answer itself: logged, and a 500 if nothing was sent."""
        raise NotImplementedError

    @classmethod
    def paths(cls, prefix: str = "") -> Iterator[tuple[str, type["Node"]]]:
        """This node's path and every one below it, C{{id}} for a numeric segment, each with its node's class."""
        yield prefix, cls
        for segment, child in cls.below.items():
            yield from child.paths(f"{prefix}/{segment.decode()}")
        if cls.item is not None:
            yield from cls.item.paths(prefix + "/{id}")


def numbered(base: type[Node], below: dict[bytes, type[Node]]) -> type[Node]:
    """A path that is no route, nor is a numeric segment below it, only the way to C{below}: C{/events/<id>/redeliver}."""
    return type(base.__name__, (base,), {"item": type(base.__name__, (base,), {"below": below})})
