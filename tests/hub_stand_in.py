"""A local stand-in for the few Hugging Face Hub API routes `--push_to_hub` uses (for tests; no network).

    python tests/hub_stand_in.py <folder>

Listens on 127.0.0.1 at a free port and writes it to `<folder>/port`. Point `HF_ENDPOINT` at it, with
`HF_HUB_DISABLE_XET=1` (plain git commits instead of the Xet protocol). Routes:

- `POST /api/repos/create`                          -> creates `<folder>/repos/<namespace>/<name>`
- `POST /api/validate-yaml`                         -> accepts every model card
- `POST /api/models/<repo>/preupload/<revision>`    -> every file is a regular (inline) upload
- `POST /api/models/<repo>/commit/<revision>`       -> writes the NDJSON commit's files into the repo folder
- `GET /api/models/<repo>[/revision/<rev>]`        -> repository info with its file list (downloads)
- `GET /api/models/<repo>/tree/<rev>`               -> recursive file listing (snapshot downloads)
- `HEAD|GET /<repo>/resolve/<revision>/<path>`      -> serves a committed file, or 404 `EntryNotFound`

Every request is appended to `<folder>/requests.jsonl`; unknown routes answer 404 and are logged as such.
"""

import base64
import hashlib
import json
import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


ROOT = sys.argv[1] if __name__ == "__main__" else None
REPO = r"(?P<repo>[^/]+/[^/]+)"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _record(self, known: bool):
        with open(os.path.join(ROOT, "requests.jsonl"), "a") as file:
            file.write(json.dumps({"method": self.command, "path": self.path, "known": known}) + "\n")

    def _reply(self, status: int, payload=None, headers=None, body: bytes | None = None):
        data = body if body is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _repo_dir(self, repo: str) -> str:
        return os.path.join(ROOT, "repos", repo)

    def do_POST(self):  # noqa: N802
        path = self.path.split("?")[0]
        body = self._body()
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request.get('organization') or 'stand-in-user'}/{request['name']}"
            os.makedirs(self._repo_dir(repo), exist_ok=True)
            self._record(True)
            return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            self._record(True)
            return self._reply(200, {})
        match = re.fullmatch(rf"/api/models/{REPO}/preupload/[^/]+", path)
        if match:
            files = json.loads(body)["files"]
            self._record(True)
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        match = re.fullmatch(rf"/api/models/{REPO}/commit/[^/]+", path)
        if match and os.path.isdir(self._repo_dir(match["repo"])):
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    target = os.path.join(self._repo_dir(match["repo"]), item["value"]["path"])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as file:
                        file.write(base64.b64decode(item["value"]["content"]))
                elif item["key"] != "header":
                    self._record(False)
                    return self._reply(400, {"error": f"unsupported commit operation {item['key']}"})
            self._record(True)
            oid = hashlib.sha1(body).hexdigest()
            url = f"http://{self.headers['Host']}/{match['repo']}/commit/{oid}"
            return self._reply(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})
        self._record(False)
        return self._reply(404, {"error": "unknown route"})

    def do_HEAD(self):  # noqa: N802
        return self.do_GET()

    def do_GET(self):  # noqa: N802
        match = re.fullmatch(rf"/api/models/{REPO}(?P<tail>/revision/[^/]+|/tree/[^/]+)?", self.path.split("?")[0])
        if match:
            folder = self._repo_dir(match["repo"])
            self._record(True)
            if not os.path.isdir(folder):
                return self._reply(404, {"error": "repo"}, headers={"X-Error-Code": "RepoNotFound"})
            files = sorted(
                os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                for root, _, names in os.walk(folder)
                for name in names
            )
            if match["tail"] and match["tail"].startswith("/tree/"):  # recursive listing, files only
                entries = []
                for name in files:
                    with open(os.path.join(folder, name), "rb") as file:
                        data = file.read()
                    entries.append(
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    )
                return self._reply(200, entries)
            info = {"id": match["repo"], "sha": "0" * 40, "private": False, "tags": ["diffusers"]}
            return self._reply(200, {**info, "siblings": [{"rfilename": name} for name in files]})
        match = re.fullmatch(rf"/{REPO}/resolve/[^/]+/(?P<file>.+)", self.path.split("?")[0])
        if match:
            self._record(True)
            target = os.path.join(self._repo_dir(match["repo"]), match["file"])
            if not os.path.isdir(self._repo_dir(match["repo"])):
                return self._reply(404, {"error": "repo"}, headers={"X-Error-Code": "RepoNotFound"})
            if not os.path.isfile(target):
                return self._reply(404, {"error": "entry"}, headers={"X-Error-Code": "EntryNotFound"})
            with open(target, "rb") as file:
                data = file.read()
            etag = hashlib.sha1(data).hexdigest()
            return self._reply(200, body=data, headers={"ETag": f'"{etag}"', "X-Repo-Commit": "0" * 40})
        self._record(False)
        return self._reply(404, {"error": "unknown route"})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(os.path.join(ROOT, "port.tmp"), "w") as file:
        file.write(str(server.server_address[1]))
    os.replace(os.path.join(ROOT, "port.tmp"), os.path.join(ROOT, "port"))
    server.serve_forever()
