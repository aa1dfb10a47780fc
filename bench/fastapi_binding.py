"""The project served with FastAPI's own parameter binding instead of app/api/binding.py's:
what removing the binder would cost, measured by the `http` section beside the project.

`python -m bench.fastapi_binding` serves exactly as `python -m app` does (one process, the
same uvicorn settings), but every BoundRoute hands its request to FastAPI's handler, as a
plain APIRoute does (dependency solving per request). tests/test_api_binding.py holds the
two to the same answers.
"""

from fastapi.routing import APIRoute

from app.api.binding import BoundRoute

BoundRoute.get_route_handler = APIRoute.get_route_handler  # type: ignore[method-assign]

if __name__ == "__main__":
    from app.__main__ import serve

    serve("app.main:app")
