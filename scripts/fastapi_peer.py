"""The benchmark's peer: the original FastAPI service's run lookup, rebuilt from its description.

`GET /api/rmos/runs/{run_id}` reads `<dir>/<run_id>.json` from a JSON data directory (the
original service's store: one pretty-printed file per run) and returns it; an unknown run is
404 and a malformed id 422, as FastAPI answers them. Nothing else: it stands in for the
original service in `benches/http.rs`, which runs it with uvicorn from .tools/peer-venv
(`scripts/install-deps.sh --peer`, pins in scripts/peer-requirements.txt):

    RMOS_PEER_DIR=/path/to/runs .tools/peer-venv/bin/uvicorn --app-dir scripts \
        fastapi_peer:app --host 127.0.0.1 --port 8001 --log-level warning
"""

import json
import os
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi import Path as PathParam

RUNS_DIR = Path(os.environ.get("RMOS_PEER_DIR", "data/rmos_runs"))

app = FastAPI(title="rmos runs (peer)")


@app.get("/api/rmos/runs/{run_id}")
def get_run(run_id: str = PathParam(pattern=r"^run_[a-f0-9]{12}$")) -> dict:
    # A plain `def`: FastAPI runs it in its thread pool, as it does the original's file reads.
    path = RUNS_DIR / f"{run_id}.json"
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise HTTPException(status_code=404, detail=f"run {run_id} not found")


@app.get("/healthz")
def healthz() -> str:
    return "ok"
