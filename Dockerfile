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

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when the
# dependency list changes, not on every code change. (README.md* matches nothing
# harmlessly while the file is absent; pyproject.toml names it as the long description.)
COPY pyproject.toml README.md* ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the code, and the package itself (its dependencies are already satisfied above).
# app/ and alembic.ini also stay in /app so that `alembic upgrade head` works from here.
COPY alembic.ini ./
COPY app ./app
RUN pip install . \
    && rm -rf build ./*.egg-info \
    && mkdir -p /app/data \
    && chown app:app /app/data

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
