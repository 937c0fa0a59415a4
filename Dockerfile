# notifier as a container image: wheels are built in throwaway stages and installed into a slim
# Python 3.11 runtime, which has no compiler, no build tools and no source tree.
#
#   DOCKER_BUILDKIT=1 docker build -t notifier .
#   docker run -p 7725:7725 -p 7726:7726 -v notifier-data:/data notifier
#
# State lives in the /data volume: the SQLite file (when no PostgreSQL URL is given) and the
# outbox. Templates are read from /app/templates, read-only: mount a folder there (compose does)
# or build FROM this image and COPY them in. See docs/container.md.
#
# Layered for the build cache: the dependencies' wheels depend only on the dependency list
# (extracted from pyproject.toml), so a change to notifier's code rebuilds only notifier's own
# small wheel and the last layer; pip's download cache is a BuildKit cache mount, so even a
# changed dependency list downloads only what is new.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- requirements: the [project] dependencies, one a line ----------------------------------------
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /requirements.txt

# --- dependencies: a wheel of each, rebuilt only when requirements.txt changes -------------------
FROM ${PYTHON_IMAGE} AS dependencies
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=requirements /requirements.txt /wheels/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels --requirement /wheels/requirements.txt

# --- application: notifier's own wheel, without its dependencies ---------------------------------
FROM ${PYTHON_IMAGE} AS application
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY notifier ./notifier
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric id, so orchestrators can check runAsNonRoot and volumes can be chowned to it.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /data \
        --shell /usr/sbin/nologin notifier \
 && mkdir -p /data /app/templates \
 && chown 10001:10001 /data
# Installed offline from the wheel stages into a venv without pip; the wheels are bind mounted
# for these steps only, so they never become a layer of the image. Dependencies first: their
# layer stays cached while only notifier's code changes.
RUN --mount=type=bind,from=dependencies,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/notifier \
 && pip --python /opt/notifier/bin/python install --no-cache-dir --no-index \
        --find-links /wheels --requirement /wheels/requirements.txt
RUN --mount=type=bind,from=application,source=/wheels,target=/wheels \
    pip --python /opt/notifier/bin/python install --no-cache-dir --no-index --no-deps /wheels/*.whl

# The image's defaults; every other setting keeps the default in .env.example. The listener
# binds all interfaces, as it must for a published port to reach it.
ENV PATH=/opt/notifier/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NOTIFIER_HOST=0.0.0.0 \
    NOTIFIER_PORT=7725 \
    NOTIFIER_HTTP_PORT=7726 \
    NOTIFIER_DATABASE_URL=sqlite:////data/notifier.db \
    NOTIFIER_OUTBOX_DIR=/data/outbox \
    NOTIFIER_TEMPLATES_DIR=/app/templates

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 7725 7726

# /healthz on the HTTP listener, with the standard library only (the image has no curl): any
# answer but 2xx, or none, raises and exits non-zero. It follows NOTIFIER_HTTP_PORT, so it
# needs the HTTP listener on (NOTIFIER_HTTP_PORT=0 turns both off: disable the check then).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('NOTIFIER_HTTP_PORT', '7726'), timeout=4)"]

# Exec form: notifier is PID 1 and gets SIGTERM itself (no shell in between), finishes or
# releases in-flight work within NOTIFIER_SHUTDOWN_GRACE seconds and exits 0. Give `docker stop`
# a longer timeout than that grace (compose sets stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["notifier", "serve"]
