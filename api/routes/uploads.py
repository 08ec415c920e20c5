"""/v1/uploads: embeddings for diagnose jobs, streamed to disk under a size limit."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api import multipart
from api.deps import CurrentTeam, SessionDep, SettingsDep
from api.schemas import ErrorOut, UploadOut

router = APIRouter(
    prefix="/uploads",
    tags=["uploads"],
    responses={401: {"model": ErrorOut}, 503: {"model": ErrorOut}},
)

# The body is parsed by hand (streamed, size-checked per chunk), so FastAPI cannot
# infer it; describe it for the OpenAPI schema and generated clients.
_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".npy (N, D) float array, or .npz with"
                            " 'embeddings' and optional 'labels' (N,) ints",
                        }
                    },
                }
            }
        },
    }
}


def _content_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


@router.post(
    "",
    status_code=201,
    openapi_extra=_MULTIPART_BODY,
    responses={413: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
async def create_upload(
    request: Request, session: SessionDep, settings: SettingsDep, team: CurrentTeam
) -> UploadOut:
    """Upload embeddings (multipart form, field ``file``) for a diagnose job."""
    upload = await multipart.save_upload(
        session=session,
        settings=settings,
        team=team,
        chunks=request.stream(),
        content_type=request.headers.get("content-type", ""),
        content_length=_content_length(request),
    )
    return UploadOut.model_validate(upload)
