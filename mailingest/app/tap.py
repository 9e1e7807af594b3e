"""
The twistd plugin: C{twistd mailingest [options]}.

L{Options} is generated from L{mailingest.app.options.ALL_OPTIONS} so the plugin,
the environment variables and the config file always agree; L{makeService}
assembles the daemon's service tree.
"""

import os

from twisted.application import service
from twisted.python import usage

from mailingest.app.options import ALL_OPTIONS
from mailingest.app.settings import Settings
from mailingest.app.user_errors import one_line, user_message
from mailingest.errors import ConfigError
from mailingest.ops.logs import install_twistd_logger
from mailingest.ops.secrets import url_passwords


def _option_tables():
    parameters, handlers, flags = [], {}, []
    for option in ALL_OPTIONS:
        if option.repeatable:
            handlers[option.key] = option
            continue
        if option.flag:
            flags.append([option.name, None, option.help])
            continue
        shown = option.default
        doc = option.help + ("" if shown is None else f" [default: {shown}]")
        parameters.append([option.name, None, None, doc])
    return parameters, handlers, flags


_PARAMETERS, _REPEATABLE, _FLAGS = _option_tables()


class Options(usage.Options):
    longdesc = (
        "Receive business mail over SMTP for known organisations, keep every "
        "accepted message and extract its attachments. Every option can also be "
        "set as MAILINGEST_<OPTION> in the environment or in the [mailingest] "
        "section of a --config file; the command line wins, then the environment, "
        "then the file."
    )
    optParameters = [["config", "c", None, "INI file with a [mailingest] section"]] + _PARAMETERS
    optFlags = _FLAGS

    def __init__(self):
        super().__init__()
        for key in _REPEATABLE:
            self[key] = []

    def getSynopsis(self) -> str:
        """twistd would print its own synopsis, the plugin name and ours: twistd's options come first."""
        return "Usage: twistd [twistd options] mailingest [options]"

    def opt_smtp(self, endpoint):
        """SMTP listening endpoint, repeatable [default: tcp:2525]"""
        self["smtp"].append(endpoint)

    def opt_domain(self, domain):
        """recipient domain we accept mail for, repeatable [default: localhost]"""
        self["domain"].append(domain)

    def opt_mx_host(self, name):
        """another host name a custom domain's MX may name besides --hostname, repeatable"""
        self["mx_host"].append(name)

    def opt_proxy_trusted(self, networks):
        """network (CIDR) whose PROXY headers are believed, repeatable or comma-separated; required with a haproxy: endpoint"""
        self["proxy_trusted"] += networks.replace(",", " ").split()

    def postOptions(self):
        given = {k.replace("-", "_"): v for k, v in self.items()}
        for flag in _FLAGS:
            # An absent flag is not given: the environment or the file may still set it.
            given[flag[0].replace("-", "_")] = True if given.get(flag[0].replace("-", "_")) else None
        try:
            self.settings = Settings.settle(given, os.environ, self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e))
        install_twistd_logger(self, self.settings.log_format, self.settings.database)


def makeService(options: Options) -> service.IService:
    from mailingest.app.service import build_daemon

    try:
        return build_daemon(options.settings)
    except ConfigError as e:
        raise SystemExit(f"mailingest: {e}")
    except Exception as e:
        # A database or directory the daemon cannot use: one line, as the admin command says it.
        message = user_message(e, options.settings.database)
        if message is None:
            raise
        raise SystemExit("mailingest could not start: " + one_line(message, url_passwords(options.settings.database or "")))
