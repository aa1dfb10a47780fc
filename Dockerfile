# Shopping-assistant persistence service.
#   docker build -t shopping-assistant-persistence .
#   docker run -p 8000:8000 -e DATABASE_URL=postgresql+asyncpg://user:pass@host:5432/db shopping-assistant-persistence
# Configuration: environment variables, see .env.example (.env itself is not copied into the image).

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged user the service runs as (numeric ids, so runAsNonRoot checks can verify it).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin app

WORKDIR /app

# Dependencies first, exactly as uv.lock names them (with their hashes), from the lock and
# pyproject.toml alone: this layer is rebuilt only when they change, not on every code
# change. uv comes from PyPI, pinned as in the Makefile, and leaves the image afterwards.
ARG UV_VERSION=0.13.10
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PATH=/opt/venv/bin:$PATH
COPY pyproject.toml uv.lock ./
RUN pip install "uv==${UV_VERSION}" \
    && uv sync --locked --no-dev --no-cache \
    && pip uninstall --yes uv

# Then the code, run from /app as it is (pyproject.toml: nothing to build). app/ and
# alembic.ini stay in /app so that `alembic upgrade head` works from here.
COPY alembic.ini ./
COPY app ./app
RUN mkdir -p /app/data && chown app:app /app/data

# The code stays root-owned and read-only for the service; only /app/data is writable.
# The built-in SQLite default (./assistant.db) would land in read-only /app, so the image
# points it at /app/data (mount a volume there to keep it). Compose and production set
# DATABASE_URL to PostgreSQL instead.
# The outage journal (SPEC §9) goes there too: it must outlive the container.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_URL=sqlite+aiosqlite:////app/data/assistant.db \
    OUTAGE_JOURNAL_PATH=/app/data/outage-journal.db

USER 10001:10001

EXPOSE 8000

# Liveness: /health answers 200 while the process serves (no curl in slim: use urllib,
# which raises, and so exits non-zero, on a refused connection or a non-2xx status).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=4)"]

CMD ["python", "-m", "app"]
