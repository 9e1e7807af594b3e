# mailingest: SMTP ingest daemon, as a slim non-root image.
#
#   docker build -t mailingest .
#   docker run -p 25:25 -p 127.0.0.1:8025:8025 -e MAILINGEST_DOMAIN=ingest.example.com mailingest
#
# Options come from MAILINGEST_* environment variables or from arguments
# after the image name (arguments win), e.g. `docker run mailingest --domain
# ingest.example.com --log-format json`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system mailingest \
 && useradd --system --gid mailingest --home-dir /var/lib/mailingest \
            --no-create-home --shell /usr/sbin/nologin mailingest \
 && install -d -o mailingest -g mailingest -m 0750 /var/lib/mailingest

# Only what the package build needs.
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY mailingest/ mailingest/
COPY twisted/ twisted/
# Installed as root, then twistd's plugin cache is written once here: the
# non-root user could not write it into site-packages at run time.
RUN pip install --no-cache-dir . \
 && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && rm -rf /src

WORKDIR /var/lib/mailingest
VOLUME /var/lib/mailingest

# Defaults as environment variables rather than arguments, so that both
# `docker run -e MAILINGEST_SMTP=tcp:2525` and `docker run IMAGE --smtp
# tcp:2525` override them.
#
# Port 25 as a non-root user: Docker >= 20.10 sets
# net.ipv4.ip_unprivileged_port_start=0 in the container's own network
# namespace, so binding 25 needs no capability. With an older engine or
# --network=host that does not apply: set MAILINGEST_SMTP=tcp:2525 and publish
# it as 25 (-p 25:2525), or pass --sysctl net.ipv4.ip_unprivileged_port_start=0.
#
# The ops endpoint listens on all container interfaces so it can be published;
# publish it on the host's loopback only (-p 127.0.0.1:8025:8025).
ENV MAILINGEST_SMTP=tcp:25 \
    MAILINGEST_HTTP=tcp:8025

USER mailingest
EXPOSE 25 8025

# No curl in the slim image: Python's urllib does the probe. It assumes the ops
# endpoint on port 8025; change it here if MAILINGEST_HTTP changes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8025/healthz', timeout=4)"]

# SIGTERM (docker stop) makes the daemon finish DATA in progress and exit
# within 15 s: give `docker stop` more than its default 10 s (-t 20).
STOPSIGNAL SIGTERM
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "mailingest"]
CMD []
