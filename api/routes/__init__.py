"""The planner API's routes, one router per concern; ``api.app.create_app`` mounts them."""

from typing import Any

# A positive, finite query number (FastAPI passes these straight to pydantic).
Pos: dict[str, Any] = dict(gt=0, le=1e9, allow_inf_nan=False)
