"""Auth and scope: bearer keys stored hashed, revocable; a team sees only its own jobs."""

from __future__ import annotations

import hashlib
import subprocess
import uuid

import httpx
from conftest import LDREG, create_team
from sqlalchemy import select, text

from service.db import session_scope
from service.models import ApiKey, Artifact

PRETRAIN = {"method": "simclr", "epochs": 1, "batch_size": 32, "ldreg": {"k": 8}}


def ldreg_admin(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LDREG, "admin", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_missing_bad_and_revoked_keys_are_401_and_admin_cli_manages_keys(
    api_server: str, service_env: dict[str, str]
) -> None:
    r = httpx.get(f"{api_server}/v1/jobs")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "unauthorized"
    assert "Authorization: Bearer" in r.json()["error"]["message"]

    for header in ("Bearer ldr_not-a-real-key", "Bearer nonsense", "Basic dXNlcjpwYXNz"):
        r = httpx.get(f"{api_server}/v1/jobs", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.headers["WWW-Authenticate"].startswith("Bearer")

    # A second key for the same team, then revoke the first by its printed prefix.
    team = f"team-{uuid.uuid4().hex[:8]}"
    first = create_team(service_env, team)
    made = ldreg_admin(service_env, "create-key", team)
    assert made.returncode == 0, made.stderr
    second = made.stdout.strip().splitlines()[-1]
    for key in (first, second):
        assert (
            httpx.get(
                f"{api_server}/v1/jobs", headers={"Authorization": f"Bearer {key}"}
            ).status_code
            == 200
        )

    revoked = ldreg_admin(service_env, "revoke-key", first[:12])
    assert revoked.returncode == 0, revoked.stderr
    r = httpx.get(f"{api_server}/v1/jobs", headers={"Authorization": f"Bearer {first}"})
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert (
        httpx.get(
            f"{api_server}/v1/jobs", headers={"Authorization": f"Bearer {second}"}
        ).status_code
        == 200
    )

    # The admin CLI refuses what it cannot do, with a message and exit status 1.
    again = ldreg_admin(service_env, "create-team", team)
    assert again.returncode == 1 and "already exists" in again.stderr
    missing = ldreg_admin(service_env, "revoke-key", "ldr_zzzzzzzz")
    assert missing.returncode == 1 and "no such API key" in missing.stderr

    # Health endpoints need no key.
    assert httpx.get(f"{api_server}/healthz").status_code == 200


def test_keys_are_stored_only_as_sha256(client: httpx.Client, team_key: str, pg_url: str) -> None:
    assert client.get("/v1/jobs").status_code == 200
    with session_scope(pg_url) as s:
        key = s.scalars(
            select(ApiKey).where(ApiKey.key_hash == hashlib.sha256(team_key.encode()).hexdigest())
        ).one()
        assert key.prefix == team_key[:12]
        # Nowhere in the keys table does the plaintext (or its secret part) appear.
        dump = s.execute(text("SELECT api_keys::text FROM api_keys")).scalars().all()
    assert dump and not any(team_key in row or team_key[12:] in row for row in dump)


def test_other_teams_jobs_are_404_everywhere(
    api_server: str, client: httpx.Client, service_env: dict[str, str], pg_url: str
) -> None:
    job = client.post("/v1/jobs", json={"kind": "pretrain", "spec": PRETRAIN}).json()
    with session_scope(pg_url) as s:
        s.add(Artifact(job_id=job["id"], name="model.pt", path="model.pt", size=1))

    other_key = create_team(service_env)
    with httpx.Client(
        base_url=api_server, headers={"Authorization": f"Bearer {other_key}"}
    ) as other:
        base = f"/v1/jobs/{job['id']}"
        for method, path in [
            ("GET", base),
            ("GET", f"{base}/metrics"),
            ("GET", f"{base}/events"),
            ("GET", f"{base}/artifacts"),
            ("GET", f"{base}/artifacts/model.pt"),
            ("POST", f"{base}/cancel"),
            ("POST", f"{base}/retry"),
        ]:
            r = other.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "not_found"
        assert other.get("/v1/jobs").json()["jobs"] == []

    # The owner still sees it, untouched by the other team's cancel.
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"
