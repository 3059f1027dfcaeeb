# sipbill production image.
#   docker build -t sipbill .
#   docker run -d --name sipbill -p 5060:5060/udp -p 5060:5060/tcp -p 8080:8080 \
#       -v sipbill-data:/var/lib/sipbill \
#       -v /etc/sipbill/sipbill.toml:/etc/sipbill/sipbill.toml:ro \
#       -e SIPBILL_ADVERTISED_HOST=192.0.2.10 \
#       -e SIPBILL_DATABASE_URL=postgresql://sipbill:secret@db/sipbill sipbill
# SIPBILL_ADVERTISED_HOST (the address phones reach the server at, written into Via and
# Record-Route) is required: the image listens on 0.0.0.0.
# The install step is the one `make install` runs (pip install of this project), without the
# dev extras, so the image runs what CI tests.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system sipbill \
    && useradd --system --gid sipbill --home-dir /var/lib/sipbill --shell /usr/sbin/nologin sipbill \
    && install -d -o sipbill -g sipbill -m 0750 /var/lib/sipbill \
    && install -d -m 0755 /etc/sipbill

WORKDIR /opt/sipbill
COPY . /opt/sipbill
# gcc only for the build: the optional C accelerators (sipcore/_fastparse.c, about 3x faster
# parsing; sipcore/_udpsend.c, batched UDP sends) and the mypyc-compiled request path
# (sipcore.COMPILED) are built, then the compiler is removed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && python -m pip install --upgrade pip \
    && python -m pip install . \
    && (cd / && python -c "import sipcore, sipcore._fastparse, sipcore._udpsend; \
assert sipcore.NATIVE, sipcore.NATIVE_STATUS") \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && install -m 0644 config/docker.toml /etc/sipbill/sipbill.toml

# Data: embedded PostgreSQL (when no SIPBILL_DATABASE_URL), nonce secret, control socket.
VOLUME /var/lib/sipbill
# SIP over UDP and TCP; HTTP for /health and /metrics.
EXPOSE 5060/udp 5060/tcp 8080

USER sipbill
WORKDIR /var/lib/sipbill

# /health answers 200 only when the database is reachable; it also lists the listeners.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["sipbill", "--config", "/etc/sipbill/sipbill.toml"]
CMD ["serve"]
