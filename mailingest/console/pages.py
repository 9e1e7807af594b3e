"""
The console's pages as twisted.web.template tag trees: every value from mail
(subjects, senders, filenames, headers) goes in as text, so the flattener
escapes it; no page carries a script, and mail bodies are never shown.
"""

from collections.abc import Callable, Iterable
from typing import NamedTuple
from urllib.parse import urlencode

from twisted.web.template import Tag, tags

from mailingest.delivery.domains import shown_domain
from mailingest.handoff.events import withheld
from mailingest.storage.retention import gone
from mailingest.storage.store import MESSAGE_STATUSES as STATUSES
from mailingest.timestamps import iso
VERDICTS = ("spf", "dkim", "dmarc", "arc")


def when(value) -> str:
    """A timestamp to the second, in UTC."""
    text = iso(value)
    return "" if text is None else text.replace("T", " ")[:19] + " UTC"


def layout(title: str, body: Iterable, session=None, notice: str | None = None) -> Tag:
    """The frame of every page: the stylesheet, the navigation and the sign-out form."""
    nav = tags.nav()
    if session is not None:
        nav(
            tags.a("Organisations", href="/console/orgs"),
            " ",
            tags.a("Status", href="/console/status"),
            " ",
            action_form("/console/sign-out", "Sign out", session),
        )
    return tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{title} · mailingest"),
            tags.link(rel="stylesheet", href="/console/static/console.css"),
        ),
        tags.body(
            tags.header(tags.strong("mailingest"), nav),
            Tag("main")(
                tags.h1(title),
                tags.p(notice, class_="notice", role="status") if notice else "",
                *body,
            ),
        ),
    )


def action_form(url: str, label: str, session, consent: str | None = None, **hidden: str) -> Tag:
    """A POST button carrying the session's CSRF token (and, with C{consent}, a box to tick first, sent as C{consent=yes})."""
    form = tags.form(method="post", action=url, class_="action")(tags.input(type="hidden", name="csrf", value=session.csrf))
    for name, value in hidden.items():
        form(tags.input(type="hidden", name=name, value=value))
    if consent:
        form(tags.label(tags.input(type="checkbox", name="consent", value="yes", required=""), " ", consent, class_="consent"), " ")
    return form(tags.button(label, type="submit"))


def sign_in(csrf: str, error: str | None = None) -> Tag:
    """The sign-in form, carrying the pre-session token that its cookie must match."""
    return layout(
        "Sign in",
        [
            tags.p(error, class_="error", role="alert") if error else "",
            tags.form(method="post", action="/console/sign-in")(
                tags.input(type="hidden", name="csrf", value=csrf),
                tags.label("API token ", tags.input(type="password", name="token", autocomplete="off", required="")),
                tags.button("Sign in", type="submit"),
            ),
        ],
    )


def table(headings: Iterable[str], rows: Iterable[Iterable]) -> Tag:
    return tags.div(class_="scroll")(
        tags.table(tags.thead(tags.tr(*[tags.th(h) for h in headings])), tags.tbody(*[tags.tr(*[tags.td(c) for c in row]) for row in rows]))
    )


def organisations(orgs: list[dict], session) -> Tag:
    """Today's arrivals per organisation, then the same messages counted by their status now (a status, not an arrival)."""
    rows = [
        (
            tags.a(org["slug"], href=f"/console/orgs/{org['id']}/messages"),
            org["name"],
            "yes" if org["active"] else "no",
            str(sum(org["counts"].values())),
            *[str(org["counts"].get(status, 0)) for status in STATUSES],
            when(org["last_received_at"]),
        )
        for org in orgs
    ]
    headings = ("Slug", "Name", "Active", "Arrived today", *[f"Status {s}" for s in STATUSES], "Last message")
    note = tags.p(
        "Arrived today: messages received since 00:00 UTC. The status columns count those same messages by their status now."
    )
    return layout("Organisations", [note, table(headings, rows)], session)


def domains_section(domains: list[dict]) -> list:
    """An organisation's own domains and where their verification stands (issue 27); nothing when it has none."""
    if not domains:
        return []
    rows = [
        (
            tags.span(shown_domain(d["domain"]), title=d["domain"]),
            tags.span(d["status"], class_=f"status domain-{d['status']}"),
            ", ".join(d["local_parts"]) or "any",
            when(d["checked_at"]),
            when(d["txt_missing_since"]),
            d["last_error"] or "",
        )
        for d in domains
    ]
    return [tags.h2("Domains"), table(("Domain", "Status", "Local parts", "Last checked", "TXT missing since", "Problem"), rows)]


def messages(
    org: dict, rows: list[dict], filters: dict, next_cursor: str | None, session, error: str | None = None, domains: list[dict] = (),
    searched_to: dict | None = None,
) -> Tag:
    """
    An organisation's messages. C{searched_to} is the oldest message a text
    search looked at when it stopped short of a full page (the store bounds
    what one search costs): the page says so and offers to go on from there.
    """
    form = tags.form(method="get", action=f"/console/orgs/{org['id']}/messages", class_="filters")(
        tags.label("Search ", tags.input(type="search", name="q", value=filters.get("q", ""), placeholder="subject, sender or Message-ID")),
        tags.label(
            "Status ",
            tags.select(name="status")(
                tags.option("any", value=""),
                *[
                    tags.option(s, value=s, selected="") if filters.get("status") == s else tags.option(s, value=s)
                    for s in STATUSES
                ],
            ),
        ),
        tags.label("Sender ", tags.input(type="email", name="sender", value=filters.get("sender", ""))),
        tags.label("From ", tags.input(type="date", name="from", value=filters.get("from", ""))),
        tags.label("To ", tags.input(type="date", name="to", value=filters.get("to", ""))),
        tags.button("Filter", type="submit"),
    )
    table_rows = [
        (
            tags.span(row["status"], class_=f"status {row['status']}"),
            row["mail_from"],
            tags.a(row["subject"] or "(no subject)", href=f"/console/messages/{row['id']}"),
            when(row["received_at"]),
            str(row["documents"]),
        )
        for row in rows
    ]
    more = stopped = ""
    if next_cursor:
        query = {k: v for k, v in filters.items() if v and k != "cursor"}
        query["cursor"] = next_cursor
        older = f"/console/orgs/{org['id']}/messages?{urlencode(query)}"
        more = tags.p(tags.a("Older messages →", href=older, rel="next"))
        if searched_to is not None:
            more, stopped = "", tags.p(
                f"Searched the messages received since {when(searched_to['received_at'])}: searching further back"
                " would take longer than one page may, so older messages are searched on request. ",
                tags.a("Search older messages →", href=older, rel="next"),
                class_="notice", role="status",
            )
    empty = tags.p("No messages match.") if not rows and not error and not stopped else ""
    return layout(
        f"Messages of {org['slug']}",
        [
            tags.p(error, class_="error", role="alert") if error else "",
            *domains_section(list(domains)),
            form,
            table(("Status", "Sender", "Subject", "Received", "Documents"), table_rows),
            empty,
            stopped,
            more,
        ],
        session,
    )


def definitions(pairs: Iterable[tuple[str, object]]) -> Tag:
    dl = tags.dl()
    for term, value in pairs:
        dl(tags.dt(term), tags.dd("" if value is None else str(value)))
    return dl


def message(
    row: dict, headers: list[tuple[str, str]], truncated: bool, documents: list[dict], events: list[dict], session, history: Iterable[dict] = ()
) -> Tag:
    mid = row["id"]
    actions = [
        tags.a(action.label + "…", href=f"/console/messages/{mid}/{name}", class_="action")
        for name, action in ACTIONS.items()
        if session.admin and applies(row, action)
    ]
    incinerated = gone(row)
    document_rows = [
        (
            tags.span(doc["filename"], f" (deleted: {doc['deleted_reason']}, {when(doc['deleted_at'])})", class_="deleted")
            if doc.get("deleted_at") is not None
            else tags.span(doc["filename"], class_="withheld")
            if withheld(doc, row)
            else tags.a(doc["filename"], href=f"/console/documents/{doc['id']}/content", download=""),
            virus_badge(doc),
            doc["content_type"],
            str(doc["size"]),
            tags.code(doc["sha256"]),
        )
        for doc in documents
    ]
    event_rows = [
        (
            event["event_type"],
            event["status"],
            str(event["attempts"]),
            "" if event["last_status"] is None else str(event["last_status"]),
            event["last_error"] or "",
            when(event["created_at"]),
            when(event["delivered_at"]),
            action_form(f"/console/events/{event['id']}/redeliver", "Redeliver", session) if session.admin else "",
        )
        for event in events
    ]
    body = [
        tags.p(
            tags.span(row["status"], class_=f"status {row['status']}"),
            " ",
            virus_badge(row),
            " ",
            spam_badge(row),
            " ",
            ""
            if incinerated
            else tags.span("raw message withheld (infected)", class_="withheld")
            if withheld(row, row)
            else tags.a("Download raw message", href=f"/console/messages/{mid}/raw", download=""),
            " ",
            *actions,
        ),
        tags.p(incinerated.capitalize() + ".", class_="incinerated") if incinerated else "",
        tags.h2("Envelope"),
        definitions(
            [
                ("Organisation", row["org_slug"]),
                ("MAIL FROM", row["mail_from"]),
                ("RCPT TO", row["rcpt_to"]),
                ("Came in on", row.get("rcpt_domain")),
                ("Message-ID", row["source_message_id"]),
                ("Client", row["client_ip"]),
                ("HELO", row["helo"]),
                ("TLS", row["tls"]),
                ("Received", when(row["received_at"])),
                ("Parsed", when(row["parsed_at"])),
                ("Released", when(row["released_at"])),
                ("Size", f"{row['raw_size']} bytes"),
                ("SHA-256", row["raw_sha256"]),
            ]
        ),
        tags.h2("Status"),
        definitions(
            [
                ("Status", row["status"]),
                ("Attempts", row["attempts"]),
                ("Error", row["last_error"]),
                ("Quarantine reason", row["quarantine_reason"]),
                ("Incinerated", " ".join(filter(None, (when(row.get("incinerated_at")), row.get("incinerated_reason"))))),
            ]
        ),
        tags.h3("History"),
        table(("Time", "Status", "Error"), [(when(change["at"]), change["status"], change["error"] or "") for change in history]),
        tags.h2("Sender verdicts"),
        definitions([(v.upper(), " ".join(filter(None, (row[v], row.get(f"{v}_domain"))))) for v in VERDICTS]),
        tags.h2("Content verdicts"),
        definitions(
            [
                ("Malware (clamd)", " ".join(filter(None, (row.get("virus"), row.get("virus_detail")))) or "not scanned"),
                ("Spam (rspamd)", spam_text(row)),
                ("Spam symbols", row.get("spam_symbols")),
                ("Unscanned", row.get("unscanned")),
                ("Infected released", when(row.get("infected_allowed_at"))),
            ]
        ),
        tags.h2("Documents"),
        table(("File", "Malware", "Type", "Bytes", "SHA-256"), document_rows) if documents else tags.p("No documents."),
        tags.h2("Webhook events"),
        table(("Event", "Status", "Attempts", "Last HTTP status", "Last error", "Written", "Delivered", ""), event_rows)
        if events
        else tags.p("No webhook events."),
        tags.h2("Headers"),
        tags.pre(class_="headers")("".join(f"{name}: {value}\n" for name, value in headers)),
        tags.p("(headers cut short)") if truncated else "",
    ]
    return layout(row["subject"] or f"Message {mid}", body, session, session.notice)


def virus_badge(row: dict) -> Tag | str:
    """clamd's verdict on a message or document, as a badge (nothing when not scanned)."""
    verdict = row.get("virus")
    if verdict is None:
        return ""
    label = {"clean": "clean", "infected": "infected", "error": "not scanned"}.get(verdict, verdict)
    detail = row.get("virus_detail")
    return tags.span(f"{label}: {detail}" if detail else label, class_=f"verdict virus-{verdict}", title=detail or label)


def spam_text(row: dict) -> str:
    if row.get("spam_action") is None:
        return "not scanned"
    if row["spam_action"] == "error":
        return f"error: {row.get('spam_detail')}"
    return f"{row['spam_score']:g} of {row['spam_required']:g} ({row['spam_action']})"


def spam_badge(row: dict) -> Tag | str:
    """rspamd's verdict on a message, as a badge (nothing when not scanned)."""
    if row.get("spam_action") is None:
        return ""
    spam = row["spam_action"] not in ("no action", "error", "greylist")
    return tags.span("spam " + spam_text(row) if spam else "spam: " + spam_text(row), class_="verdict " + ("spam" if spam else "ham"))


class Action(NamedTuple):
    status: str  # the status it applies to (the first of C{statuses}, for the page that says why it does not)
    label: str
    effect: str
    statuses: tuple[str, ...] = ()  # all the statuses it applies to, when more than one
    needs: Callable[[dict], bool] | None = None  # what else the message must be, besides its status
    unmet: str = ""  # why it does not apply when C{needs} does not hold
    consent: str | None = None  # the box the admin must tick to confirm


def applies(row: dict, action: Action) -> bool:
    return (
        row["status"] in (action.statuses or (action.status,))
        and row.get("incinerated_reason") != "erasure"
        and (action.needs is None or action.needs(row))
    )


# The admin's actions on a message that are confirmed on a page of their own first.
ACTIONS = {
    "reprocess": Action(
        "failed",
        "Reprocess",
        "It goes back to received: its documents are extracted again from the stored message, and your"
        " application gets a webhook event when that ends.",
    ),
    "release": Action(
        "quarantined",
        "Release",
        "It is extracted past its organisation's sender and content policy (its sender verdicts are kept), and its"
        " documents are handed to your application like any other message's; an infected document stays"
        " withheld until an admin releases the infected content too (Release infected content).",
    ),
    "allow-infected": Action(
        "quarantined",
        "Release infected content",
        "ClamAV found malware in this message. Its infected documents and its raw copy become downloadable,"
        " through the API and this console, by anyone who can see the message; webhooks still never carry them."
        " This is recorded in its history (infected-allowed) and the daemon's log, as `mailingest release ID"
        " --allow-infected` does, and a quarantined message is released too.",
        ("quarantined", "parsed", "failed"),
        needs=lambda row: withheld(row, row),
        unmet="it has no infected content withheld (not infected, or already released)",
        consent="I understand that infected content will be downloadable.",
    ),
    "erase": Action(
        "parsed",
        "Erase",
        "Its raw copy and documents are deleted for good and its personal fields (sender, subject, client,"
        " sender domains) replaced; a tombstone with its digests stays, and the erasure is in the audit trail."
        " Your application gets a message.erased event. A message under a legal hold is not erased.",
        ("parsed", "failed", "quarantined", "incinerated"),
    ),
}


def inapplicable(row: dict, name: str) -> str | None:
    """Why an action does not apply to this message now (a form answered twice, a stale page); None when it does."""
    action = ACTIONS[name]
    if applies(row, action):
        return None
    if action.needs is not None:
        if row["status"] in action.statuses:
            return f"Message {row['id']}: {action.unmet}."
        return f"Message {row['id']} is {row['status']}: {action.label} applies only to a {' or '.join(action.statuses)} message."
    if action.statuses:
        return f"Message {row['id']} is {row['status']} ({row.get('incinerated_reason') or 'not settled'}): it cannot be {name}d."
    return f"Message {row['id']} is {row['status']}: only a {action.status} message can be {name}d."


def confirm(row: dict, name: str, session, error: str | None = None) -> Tag:
    """An action's confirmation: a plain POST form (no script; C{error}: why the last one was refused), or why it does not apply to this message now."""
    action, mid = ACTIONS[name], row["id"]
    summary = definitions(
        [("Subject", row["subject"]), ("MAIL FROM", row["mail_from"]), ("Received", when(row["received_at"])), ("Status", row["status"]), ("Error", row["last_error"])]
    )
    back = tags.a("Back to the message", href=f"/console/messages/{mid}")
    reason = inapplicable(row, name)
    if reason:
        return layout(f"{action.label} message {mid}", [tags.p(reason, class_="error", role="alert"), summary, tags.p(back)], session)
    return layout(
        f"{action.label} message {mid}?",
        [
            tags.p(error, class_="error", role="alert") if error else "",
            summary,
            tags.p(action.effect),
            tags.p(action_form(f"/console/messages/{mid}/{name}", action.label, session, action.consent), " ", back),
        ],
        session,
    )


def status(queue_depth: int, outbox_depth: int, rejected: dict[str, int], readiness: dict[str, str], session) -> Tag:
    """
    The admin's page has every figure. An organisation's has its own depths
    and only whether each check is ok: the SMTP rejections are nobody's in
    particular, and a check's error text may name our paths and hosts.
    """
    whose = "" if session.admin else " of this organisation"
    body = [
        definitions(
            [(f"Queue depth{whose} (received, not yet parsed)", queue_depth), (f"Webhook outbox{whose} (pending events)", outbox_depth)]
        )
    ]
    if session.admin:
        body += [
            tags.h2("Rejected in the last hour"),
            table(("Reason", "Count"), [(reason, str(n)) for reason, n in rejected.items()]) if rejected else tags.p("None."),
        ]
    else:
        readiness = {name: "ok" if result == "ok" else "unavailable" for name, result in readiness.items()}
    body += [tags.h2("Readiness"), table(("Check", "Result"), [(name, result) for name, result in readiness.items()])]
    return layout("Status", body, session)


def not_found(session=None) -> Tag:
    return layout("Not found", [tags.p("There is no such page, or it is not yours to see.")], session)


def forbidden(session) -> Tag:
    return layout("Not allowed", [tags.p("Only the admin token may do this.")], session)


def withheld_page(session, signature: str) -> Tag:
    return layout(
        "Infected: withheld",
        [
            tags.p(
                f"ClamAV found {signature} in it. An admin can let it out: Release infected content on the message's"
                " page, or `mailingest release ID --allow-infected`."
            )
        ],
        session,
    )
