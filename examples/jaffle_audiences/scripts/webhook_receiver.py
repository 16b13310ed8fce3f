"""A tiny receiver for audsync's webhook format, for the demo: it verifies each request's
signature, applies the operations to a member list, and keeps that list in a JSON file.

    python scripts/webhook_receiver.py --port 8765 --secret demo-secret --out output/webhook

Use it to see what a sync sends; it is not a production server.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--secret", default="demo-secret")
    parser.add_argument("--out", default="output/webhook")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    members_file = out / "members.json"
    members: dict = json.loads(members_file.read_text()) if members_file.exists() else {}
    lock = threading.Lock()
    secret = args.secret.encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):  # quiet: the demo prints its own lines
            pass

        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            timestamp = self.headers.get("X-Audsync-Timestamp", "")
            expected = "sha256=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, self.headers.get("X-Audsync-Signature", "")):
                self.send_response(401)
                self.end_headers()
                self.wfile.write(b'{"error": "bad signature"}')
                return
            batch = json.loads(body)
            with lock:
                for operation in batch["operations"]:
                    if operation["op"] == "remove":
                        members.pop(operation["key"], None)
                    else:
                        members[operation["key"]] = operation["fields"]
                members_file.write_text(json.dumps(members, indent=1, sort_keys=True))
                with (out / "requests.jsonl").open("a") as log:
                    log.write(json.dumps({"batch_id": batch["batch_id"], "sync": batch["sync"],
                                          "operations": len(batch["operations"])}) + "\n")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"webhook receiver listening on http://127.0.0.1:{args.port}/audsync", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
