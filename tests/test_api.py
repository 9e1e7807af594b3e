"""
The JSON API end to end: a real daemon with --api on 127.0.0.1, mail in over
SMTP, requests through a real socket.
"""

import hashlib
import http.client
import json
import os
import re
import time
from email.message import EmailMessage

import jsonschema
import openapi_spec_validator
import treq
from twisted.internet import defer, threads
from twisted.trial import unittest

from mailingest.extraction.handling import document_key
from mailingest.handoff import openapi
from mailingest.handoff.api import ApiResource, content_disposition, encode_cursor, new_token, safe_content_type, token_hash
from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.storage.blobs import open_blobs
from mailingest.storage.store import open_store
from tests.daemon import DaemonTestCase, TwistdProcess, free_port, temp_dir
from tests.store_contract import message as stored_message

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
ADMIN_TOKEN = "adm_Jq7vR2xWc9LpT4sKe8NbZ1yHg6Ud3Mf"  # 128 bits in form, as the daemon requires


def order(org: str, n: int, filename: str = "order.pdf") -> bytes:
    msg = EmailMessage()
    msg["From"] = "buyer@customer.test"
    msg["To"] = f"orders+{org}@example.com"
    msg["Subject"] = f"Order {n}"
    msg["Message-ID"] = f"<{org}-{n}@customer.test>"
    msg.set_content("Please find our order attached.\n")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename=filename)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class ApiCase(DaemonTestCase):
    extra: dict = {}  # more daemon settings of a test class

    @defer.inlineCallbacks
    def setUp(self):
        token_file = os.path.join(temp_dir(self), "admin-token")
        with open(token_file, "w") as f:
            f.write(ADMIN_TOKEN + "\n")
        self.overrides = {"poll_interval": "0.2", "api": "tcp:0:interface=127.0.0.1", "api_admin_token_file": token_file, **self.extra}
        yield super().setUp()
        yield self.daemon.store.add_org("beta", "Beta")
        self.base = f"http://127.0.0.1:{self.daemon.service.api_listener.port.getHost().port}"
        self.tokens = {}
        for org in ("acme", "beta"):
            self.tokens[org] = new_token()
            yield self.daemon.store.add_token(org, token_hash(self.tokens[org]))
        self.tokens["admin"] = ADMIN_TOKEN

    @defer.inlineCallbacks
    def deliver(self, org: str, n: int, filename: str = "order.pdf") -> int:
        code, reply = yield self.daemon.send(order(org, n, filename), [f"orders+{org}@example.com"])
        self.assertEqual(code, 250, reply)
        message_id = int(reply.split()[-1])
        row = yield self.daemon.settled(message_id)
        self.assertEqual(row["status"], "parsed")
        return message_id

    @defer.inlineCallbacks
    def get(self, path: str, who: str | None = "acme", method: str = "GET"):
        """Fire with (status, headers, body bytes)."""
        headers = {} if who is None else {"Authorization": f"Bearer {self.tokens.get(who, who)}"}
        response = yield treq.request(method, self.base + path, headers=headers, persistent=False)
        body = yield treq.content(response)
        if isinstance(response.length, int):
            # Twisted's client keeps Content-Length out of the headers, as a connection header.
            response.headers.setRawHeaders("content-length", [str(response.length)])
        return response.code, response.headers, body

    @defer.inlineCallbacks
    def get_json(self, path: str, who: str | None = "acme", status: int = 200):
        code, headers, body = yield self.get(path, who)
        self.assertEqual(code, status, body)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        return json.loads(body)


class Scoping(ApiCase):
    @defer.inlineCallbacks
    def test_organisation_token_sees_only_its_rows(self):
        mine = yield self.deliver("acme", 1)
        theirs = yield self.deliver("beta", 1)
        listing = yield self.get_json("/v1/messages")
        self.assertEqual([m["id"] for m in listing["messages"]], [mine])
        their_message = yield self.get_json(f"/v1/messages/{theirs}", "beta")
        their_document = their_message["documents"][0]["id"]
        missing = yield self.get_json("/v1/messages/999999", status=404)
        for path in (
            f"/v1/messages/{theirs}",
            f"/v1/messages/{theirs}/raw",
            f"/v1/documents/{their_document}",
            f"/v1/documents/{their_document}/content",
        ):
            refused = yield self.get_json(path, status=404)
            self.assertEqual(refused, dict(missing, message=refused["message"]))
            self.assertEqual(refused["error"], "not_found")
            code, _, _ = yield self.get(path, "beta")
            self.assertEqual(code, 200, path)
            code, _, _ = yield self.get(path, "admin")
            self.assertEqual(code, 200, path)
        everything = yield self.get_json("/v1/messages", "admin")
        self.assertEqual([m["id"] for m in everything["messages"]], [theirs, mine])

    @defer.inlineCallbacks
    def test_tokens_checked(self):
        for who, error in ((None, "unauthorized"), ("mit_unknown", "unauthorized")):
            body = yield self.get_json("/v1/messages", who, status=401)
            self.assertEqual(body["error"], error)
        yield self.get_json("/v1/messages")
        self.assertEqual((yield self.daemon.store.revoke_tokens("acme")), 1)
        body = yield self.get_json("/v1/messages", status=401)
        self.assertEqual(body["error"], "unauthorized")

    @defer.inlineCallbacks
    def test_errors_are_json_with_stable_codes(self):
        self.assertEqual((yield self.get_json("/v1/nothing", status=404))["error"], "no_route")
        self.assertEqual((yield self.get_json("/v1/messages?limit=0", status=400))["error"], "bad_parameter")
        self.assertEqual((yield self.get_json("/v1/messages?since=yesterday", status=400))["error"], "bad_parameter")
        self.assertEqual((yield self.get_json("/v1/messages?cursor=%25%25", status=400))["error"], "bad_cursor")
        code, headers, body = yield self.get("/v1/messages", method="POST")
        self.assertEqual((code, json.loads(body)["error"]), (405, "method_not_allowed"))

    @defer.inlineCallbacks
    def test_every_bad_query_value_is_a_400(self):
        """Values that pass a first look but break later (int(), UTC conversion, the database's integer) are 400s too."""
        yield self.deliver("acme", 1)
        self.assertEqual(len((yield self.get_json("/v1/messages?limit=200&since=2000-01-01T00:00:00%2B14:00"))["messages"]), 1)
        overflowing = encode_cursor(10**30)
        for query, code in (
            ("limit=%C2%B2", "bad_parameter"),  # "²".isdigit() is True, int("²") raises
            ("limit=%D9%A3", "bad_parameter"),  # an Arabic-Indic 3
            (f"cursor={overflowing}", "bad_cursor"),
            (f"cursor={encode_cursor(2**63)}", "bad_cursor"),
            ("since=0001-01-01T00:00:00%2B14:00", "bad_parameter"),
            ("since=9999-12-31T23:59:59-14:00", "bad_parameter"),
            ("status=nonsense", "bad_parameter"),
            ("status=%00", "bad_parameter"),
        ):
            body = yield self.get_json(f"/v1/messages?{query}", status=400)
            self.assertEqual(body["error"], code, query)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual((yield self.get_json(f"/v1/messages?cursor={encode_cursor(2**63 - 1)}"))["next_cursor"], None)


class Pagination(ApiCase):
    @defer.inlineCallbacks
    def test_cursor_pages_newest_first(self):
        ids = []
        for n in range(5):
            ids.append((yield self.deliver("acme", n)))
        seen, path, pages = [], "/v1/messages?limit=2", 0
        while path:
            page = yield self.get_json(path)
            seen += [m["id"] for m in page["messages"]]
            pages += 1
            path = f"/v1/messages?limit=2&cursor={page['next_cursor']}" if page["next_cursor"] else None
        self.assertEqual((seen, pages), (sorted(ids, reverse=True), 3))
        parsed = yield self.get_json("/v1/messages?status=parsed&since=2000-01-01T00:00:00Z")
        self.assertEqual(len(parsed["messages"]), 5)
        self.assertEqual((yield self.get_json("/v1/messages?status=failed"))["messages"], [])
        self.assertEqual((yield self.get_json("/v1/messages?since=2999-01-01T00:00:00Z"))["messages"], [])


class Content(ApiCase):
    @defer.inlineCallbacks
    def test_document_and_raw_streamed_with_their_headers(self):
        message_id = yield self.deliver("acme", 1, filename='Bestellung "Mai";\u00fc.pdf')
        detail = yield self.get_json(f"/v1/messages/{message_id}")
        document = detail["documents"][0]
        self.assertEqual(document["sha256"], hashlib.sha256(PDF).hexdigest())
        self.assertEqual((yield self.get_json(f"/v1/documents/{document['id']}")), document)
        code, headers, body = yield self.get(document["content_url"])
        self.assertEqual((code, body), (200, PDF))
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/pdf"])
        self.assertEqual(headers.getRawHeaders("content-length"), [str(len(PDF))])
        disposition = headers.getRawHeaders("content-disposition")[0]
        self.assertEqual(disposition, content_disposition(document["filename"]))
        self.assertNotIn('"Mai"', disposition)
        code, headers, body = yield self.get(f"/v1/messages/{message_id}/raw")
        self.assertEqual((code, headers.getRawHeaders("content-type")), (200, ["message/rfc822"]))
        self.assertEqual(hashlib.sha256(body).hexdigest(), detail["raw_sha256"])

    def test_unsafe_content_types_become_octet_stream(self):
        self.assertEqual(safe_content_type("Application/PDF"), "application/pdf")
        for hostile in ("text/html\r\nX-Evil: 1", "text/html; charset=x", "", "pdf"):
            self.assertEqual(safe_content_type(hostile), "application/octet-stream")


class OpenApi(ApiCase):
    @defer.inlineCallbacks
    def test_routes_match_the_openapi_document(self):
        message_id = yield self.deliver("acme", 1)
        document_id = (yield self.get_json(f"/v1/messages/{message_id}"))["documents"][0]["id"]
        domain_id = (yield self.daemon.store.add_domain("acme", "acme-corp.example", "tok"))["id"]
        served = yield self.get_json("/v1/openapi.json", who=None)
        self.assertEqual(served, openapi.DOCUMENT)
        routes = [template for template, _ in ApiResource(None, None).routes]
        self.assertEqual(sorted(served["paths"]), sorted(routes))
        ids = {"documents": document_id, "domains": domain_id, "messages": message_id}
        for template in routes:
            path = template.replace("{id}", str(ids.get(template.split("/")[2], 0)))
            code, _, body = yield self.get(path)
            self.assertEqual(code, 200, (template, body))

    @defer.inlineCallbacks
    def test_objects_match_their_schemas(self):
        """The schemas name every field the API sends, and nothing else (each object's properties are all required)."""
        openapi_spec_validator.validate(openapi.DOCUMENT)
        message_id = yield self.deliver("acme", 1)
        message = yield self.get_json(f"/v1/messages/{message_id}")
        error = yield self.get_json("/v1/messages?limit=0", status=400)
        for instance, schema in (
            ((yield self.get_json("/v1/messages")), "MessagePage"),
            (message, "MessageWithDocuments"),
            ((yield self.get_json(f"/v1/documents/{message['documents'][0]['id']}")), "Document"),
            (error, "Error"),
        ):
            properties = openapi.SCHEMAS[schema]["properties"]
            jsonschema.validate(instance, {**openapi.DOCUMENT, "$ref": f"#/components/schemas/{schema}"})
            self.assertEqual(sorted(instance), sorted(properties), schema)
            self.assertEqual(sorted(properties), sorted(openapi.SCHEMAS[schema]["required"]))
        self.assertRaises(
            jsonschema.ValidationError,
            jsonschema.validate,
            dict(message, status="unheard-of"),
            {**openapi.DOCUMENT, "$ref": "#/components/schemas/Message"},
        )


class FlatMemory(unittest.TestCase):
    """A 50 MB document downloads through a real socket with the daemon's memory flat."""

    SIZE = 50 * 1024 * 1024

    def setUp(self):
        self.directory = temp_dir(self)
        data = os.path.join(self.directory, "mailingest-data")
        with open(os.path.join(self.directory, "admin-token"), "w") as f:
            f.write(ADMIN_TOKEN)
        return defer.ensureDeferred(self.store_document(data))

    async def store_document(self, data: str) -> None:
        store = open_store("sqlite:///" + os.path.join(data, "mailingest.db"), MESSAGE_EVENTS)
        blobs = open_blobs("file:" + os.path.join(data, "blobs"))
        try:
            await store.migrate()
            org = await store.add_org("acme", "Acme")
            [message_id] = await store.insert_messages([stored_message(org["id"], "<big@x>")])
            path = os.path.join(self.directory, "big.bin")
            digest = hashlib.sha256()
            with open(path, "wb") as f:
                for _ in range(self.SIZE // (1024 * 1024)):
                    chunk = os.urandom(1024 * 1024)
                    digest.update(chunk)
                    f.write(chunk)
            self.sha256 = digest.hexdigest()
            key = document_key({"org_id": org["id"], "id": message_id}, 0)
            await blobs.put_file(key, path, self.sha256, self.SIZE)
            os.unlink(path)
            await store.mark_parsed(message_id, [{
                "org_id": org["id"], "ordinal": 0, "filename": "big.bin", "content_type": "application/octet-stream",
                "size": self.SIZE, "sha256": self.sha256, "storage_key": key,
            }])
            self.document_id = (await store.list_documents(message_id=message_id))[0]["id"]
        finally:
            await store.close()
            await blobs.close()

    def test_50_mb_document_with_flat_rss(self):
        api_port = free_port()
        daemon = TwistdProcess(
            self.directory, "--api", f"tcp:{api_port}:interface=127.0.0.1", "--api-admin-token-file", "admin-token"
        ).start()
        self.addCleanup(daemon.stop)
        time.sleep(0.5)
        with open(f"/proc/{daemon.process.pid}/clear_refs", "w") as f:
            f.write("5")  # peak RSS starts again from now
        before = daemon.rss_kib()

        def download():
            connection = http.client.HTTPConnection("127.0.0.1", api_port, timeout=30)
            connection.request("GET", f"/v1/documents/{self.document_id}/content", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            response = connection.getresponse()
            digest, size = hashlib.sha256(), 0
            while chunk := response.read(256 * 1024):
                digest.update(chunk)
                size += len(chunk)
                time.sleep(0.001)  # a client slower than the disk
            connection.close()
            return response.status, size, digest.hexdigest()

        def check(result):
            self.assertEqual(result, (200, self.SIZE, self.sha256))
            with open(f"/proc/{daemon.process.pid}/status") as f:
                peak = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
            growth_mib = (peak - before) / 1024
            self.assertLess(growth_mib, 20, f"daemon RSS grew {growth_mib:.1f} MiB while serving 50 MiB")

        return threads.deferToThread(download).addCallback(check)


class ActiveContentDownloads(ApiCase):
    @defer.inlineCallbacks
    def test_every_download_is_sandboxed(self):
        """A sender's HTML or SVG document, and the raw message, download with a sandbox CSP, attachment and nosniff."""
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "buyer@customer.test", "orders+acme@example.com", "Active content"
        msg["Message-ID"] = "<active@customer.test>"
        msg.set_content("See the attachments.\n")
        msg.add_attachment(b"<html><script>alert(document.cookie)</script></html>", maintype="text", subtype="html", filename="order.html")
        msg.add_attachment(b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', maintype="image", subtype="svg+xml", filename="logo.svg")
        code, reply = yield self.daemon.send(msg.as_bytes().replace(b"\n", b"\r\n"), ["orders+acme@example.com"])
        self.assertEqual(code, 250, reply)
        message_id = int(reply.split()[-1])
        self.assertEqual((yield self.daemon.settled(message_id))["status"], "parsed")
        documents = (yield self.get_json(f"/v1/messages/{message_id}"))["documents"]
        self.assertEqual(sorted(d["content_type"] for d in documents), ["image/svg+xml", "text/html"])
        for path in [d["content_url"] for d in documents] + [f"/v1/messages/{message_id}/raw"]:
            for method in ("GET", "HEAD"):
                code, headers, _ = yield self.get(path, method=method)
                self.assertEqual(code, 200, path)
                self.assertEqual(headers.getRawHeaders("content-security-policy"), ["sandbox; default-src 'none'; frame-ancestors 'none'"], path)
                self.assertTrue(headers.getRawHeaders("content-disposition")[0].startswith("attachment;"), path)
                self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"], path)


class Domains(ApiCase):
    """Custom domains (issue 27): the admin token adds and removes them, an organisation's token sees its own."""

    @defer.inlineCallbacks
    def send(self, method: str, path: str, who: str, body=None):
        headers = {"Authorization": f"Bearer {self.tokens.get(who, who)}", "Content-Type": "application/json"}
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        response = yield treq.request(method, self.base + path, headers=headers, data=data, persistent=False)
        return response.code, json.loads((yield treq.content(response)))

    @defer.inlineCallbacks
    def test_admin_adds_lists_and_removes(self):
        code, made = yield self.send("POST", "/v1/domains", "admin", {"organization": "ACME", "domain": "Bücher.example.", "local_parts": ["Orders"]})
        self.assertEqual(code, 201, made)
        self.assertEqual(
            (made["organization"], made["domain"], made["unicode"], made["status"], made["local_parts"], made["txt_name"]),
            ("acme", "xn--bcher-kva.example", "bücher.example", "pending", ["orders"], "_mailingest.xn--bcher-kva.example"),
        )
        token = made["token"]
        self.assertIn(f'_mailingest.xn--bcher-kva.example. 3600 IN TXT "mailingest-verification={token}"', made["dns_records"])
        self.assertIn("xn--bcher-kva.example. 3600 IN MX 10 mx.test.", made["dns_records"])
        jsonschema.validate(made, {**openapi.DOCUMENT, "$ref": "#/components/schemas/NewDomain"})
        code, taken = yield self.send("POST", "/v1/domains", "admin", {"organization": "beta", "domain": "XN--BCHER-KVA.EXAMPLE"})
        self.assertEqual((code, taken["error"]), (409, "domain_taken"))
        yield self.send("POST", "/v1/domains", "admin", {"organization": "beta", "domain": "beta.example"})
        listed = yield self.get_json("/v1/domains", who="admin")
        self.assertEqual([d["domain"] for d in listed["domains"]], ["beta.example", "xn--bcher-kva.example"])
        jsonschema.validate(listed, {**openapi.DOCUMENT, "$ref": "#/components/schemas/DomainList"})
        self.assertNotIn("token", listed["domains"][0])
        own = yield self.get_json("/v1/domains", who="acme")
        self.assertEqual([d["domain"] for d in own["domains"]], ["xn--bcher-kva.example"])
        self.assertEqual((yield self.get_json(f"/v1/domains/{made['id']}", who="beta", status=404))["error"], "not_found")
        code, removed = yield self.send("DELETE", f"/v1/domains/{made['id']}", "admin")
        self.assertEqual((code, removed["status"]), (200, "removed"))
        self.assertEqual((yield self.get_json("/v1/domains", who="acme"))["domains"], [])

    @defer.inlineCallbacks
    def test_organisations_cannot_change_domains_and_bad_requests_are_400(self):
        code, body = yield self.send("POST", "/v1/domains", "acme", {"organization": "acme", "domain": "acme-corp.example"})
        self.assertEqual((code, body["error"]), (403, "forbidden"))
        row = yield self.daemon.store.add_domain("acme", "acme-corp.example", "tok")
        code, body = yield self.send("DELETE", f"/v1/domains/{row['id']}", "acme")
        self.assertEqual((code, body["error"]), (403, "forbidden"))
        for given, error in (
            (b"not json", "bad_request"), ({"organization": "acme"}, "bad_request"), ({"organization": "acme", "domain": "[192.0.2.1]"}, "bad_domain"),
            ({"organization": "acme", "domain": "x.example", "local_parts": "orders"}, "bad_request"),
            ({"organization": "acme", "domain": "x.example", "local_parts": ["a@b"]}, "bad_domain"),
        ):
            code, body = yield self.send("POST", "/v1/domains", "admin", given)
            self.assertEqual((code, body["error"]), (400, error), given)
        code, body = yield self.send("POST", "/v1/domains", "admin", {"organization": "nobody", "domain": "x.example"})
        self.assertEqual((code, body["error"]), (422, "no_such_organization"))
        code, body = yield self.send("POST", "/v1/domains", "admin", b"{" + b" " * 9000 + b"}")
        self.assertEqual((code, body["error"]), (413, "too_large"))
        code, body = yield self.send("PUT", "/v1/domains", "admin", {})
        self.assertEqual((code, body["error"]), (405, "method_not_allowed"))
        code, body = yield self.send("POST", "/v1/domains", "wrong-token", {})
        self.assertEqual(code, 401)
