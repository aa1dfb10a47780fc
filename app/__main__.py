"""`python -m app`: serve the API with uvicorn.

HOST and PORT from the environment (default 127.0.0.1:8000); WEB_CONCURRENCY worker
processes (uvicorn's own variable, default 1), each with its own pools (README,
"Running on PostgreSQL"); ACCESS_LOG=false turns uvicorn's access log off.
"""

import os

import uvicorn


def serve(application: str = "app.main:app") -> None:
    """Serve `application` (an import string, so that workers can import it)."""
    uvicorn.run(
        application,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
        workers=int(os.environ.get("WEB_CONCURRENCY", "1")),
        access_log=os.environ.get("ACCESS_LOG", "true").lower() not in {"0", "false", "no"},
        proxy_headers=True,
    )


if __name__ == "__main__":
    serve()
