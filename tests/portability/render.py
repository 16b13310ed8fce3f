"""Render audsync's relation SQL with dbt's Snowflake, BigQuery and Databricks adapters, offline,
and parse every statement with sqlglot in that warehouse's dialect.

Runs in the portability environment (.ci/portability_env.sh), not audsync's: those adapters are
never audsync's dependencies. It writes a small dbt project (tests/portability/project plus one
model per sync config below) that installs this package through `packages.yml` from its local
path, with a profile whose targets are the three adapter types with dummy credentials, and runs
`dbt compile --no-introspect --no-populate-cache` for each target through dbt's programmatic
runner (Databricks keeps introspection on: see INTROSPECT). Each sync model's compiled code is
the JSON list of the statements its relations take (project/macros/portability_statements.sql);
the package's state models are rendered the same way. A socket guard refuses and records every
connection and name lookup, so a dummy host is never contacted and an attempt shows in the
report.

    python render.py --repo <audsync checkout> --work <empty dir> [--adapters snowflake,...]
                     --output report.json [--override <file.sql>]...  (extra root macros)

Writes one JSON report to --output (dbt prints to stdout): {"statements": [...], "failures":
[...], "connections": [...], "dispatch": {...}}, and exits 1 when a statement does not parse,
dbt fails, or a connection was attempted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# dbt adapter type -> sqlglot dialect.
DIALECTS = {"snowflake": "snowflake", "bigquery": "bigquery", "databricks": "databricks"}

# Dummy credentials: enough for each adapter's profile to validate. None is ever contacted.
PROFILE_TARGETS = {
    "snowflake": {
        "type": "snowflake", "account": "portability-dummy", "user": "dummy",
        "password": "dummy", "role": "dummy", "database": "analytics",
        "warehouse": "dummy", "schema": "marketing", "threads": 1,
    },
    # "keyfile_json" is filled in by _bigquery_keyfile(): dbt-bigquery makes its client (the
    # credentials, no request) even to close an unused connection, so the key must load.
    "bigquery": {
        "type": "bigquery", "method": "service-account-json", "project": "portability-dummy",
        "dataset": "marketing", "threads": 1,
    },
    "databricks": {
        "type": "databricks", "host": "portability-dummy.invalid",
        "http_path": "/sql/1.0/warehouses/dummy", "token": "dummy",
        "catalog": "main", "schema": "marketing", "threads": 1,
    },
}

_MAPPING = [
    {"source_column": "email", "destination_field": "email"},
    {"source_column": "first_name", "destination_field": "firstName"},
    {"source_column": "Lifetime Value", "destination_field": "ltv"},
    {"source_column": "signed_up_at", "destination_field": "signup"},
]

# Representative syncs: every mode, a normalised and a hashed identifier, a column that needs
# quoting, exclusions (a sync's own list and the project's) and a split group.
SYNCS = {
    "sync_mirror": {"sync_mode": "mirror", "identifier": "email", "field_mapping": _MAPPING},
    "sync_add_excluded": {
        "sync_mode": "add", "identifier": "email", "identifier_normalise": "lower_trim",
        "field_mapping": _MAPPING[:2], "exclude": ["do_not_contact"],
    },
    "sync_upsert_split": {
        "sync_mode": "upsert", "identifier": "email", "identifier_normalise": "trim",
        "field_mapping": _MAPPING, "split_group": "hv_q4.treatment",
        "exclude": [{"model": "do_not_contact", "column": "email"}],
    },
    "sync_remove": {"sync_mode": "subtractive", "identifier": "customer_id", "field_mapping": []},
    "sync_mirror_hashed": {
        "sync_mode": "mirror", "identifier": "email_hash",
        "field_mapping": [{"source_column": "country", "destination_field": "country"}],
        "split_group": "hv_q4.control",
    },
}

_COLUMNS = ["customer_id", "email", "first_name", "Lifetime Value", "signed_up_at", "country"]


def _select(name: str) -> tuple[str, list[str]]:
    """A sync's select (as a Jinja block) and the columns get_columns_in_query would return."""
    columns = ", ".join(
        f"{{{{ adapter.quote('{c}') }}}}" if " " in c else c for c in _COLUMNS
    )
    if name == "sync_mirror_hashed":
        # An identifier hashed in the select, with the adapter's own md5 (dbt.hash).
        return (
            "select {{ dbt.hash('lower(trim(email))') }} as email_hash, country "
            "from {{ source('crm', 'contacts') }}",
            ["email_hash", "country"],
        )
    return f"select {columns} from {{{{ source('crm', 'contacts') }}}}", list(_COLUMNS)


# Without --introspect a node compiles with no connection at all, so anything that would query
# fails. Databricks keeps dbt's connection (never opened: the handle is lazy, and the guard
# below proves nothing connects) because dbt-databricks' rename_relation and drop_relation,
# which the package's spark__ rewrites call, ask for the thread's connection object.
INTROSPECT = {"databricks": "--introspect"}


def _bigquery_keyfile() -> dict:
    """A service account key that loads (a throwaway RSA key made now) and reaches nothing."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {
        "type": "service_account", "project_id": "portability-dummy", "private_key_id": "dummy",
        "private_key": pem, "client_email": "dummy@portability-dummy.invalid", "client_id": "0",
        "token_uri": "https://portability-dummy.invalid/token",
    }


def write_project(repo: Path, work: Path, adapters: list[str], overrides: list[Path]) -> Path:
    """Lay out the dbt project under `work` and return its folder."""
    project = work / "project"
    if project.exists():
        shutil.rmtree(project)
    shutil.copytree(HERE / "project", project)
    (project / "packages.yml").write_text(json.dumps({"packages": [{"local": str(repo)}]}))
    (project / "profiles.yml").write_text(json.dumps({
        "audsync_portability": {
            "target": adapters[0],
            "outputs": {a: dict(PROFILE_TARGETS[a], **({"keyfile_json": _bigquery_keyfile()}
                                                       if a == "bigquery" else {}))
                        for a in adapters},
        }
    }))
    for i, path in enumerate(overrides):
        shutil.copy(path, project / "macros" / f"override_{i}_{path.name}")
    models = project / "models"
    for name, config in SYNCS.items():
        select_sql, source_columns = _select(name)
        config_args = ", ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        call = f"portability_statements(select_sql, {json.dumps(source_columns)})"
        (models / f"{name}.sql").write_text(
            "{{ config(materialized='audience_sync', destination='crm_hook', "
            f"{config_args}) }}}}\n"
            f"{{% set select_sql %}}{select_sql}{{% endset %}}\n"
            # Parsing renders a model with execute false and config values empty: only compile.
            f"{{% if execute %}}{{{{ {call} }}}}{{% endif %}}\n"
        )
    return project


class ConnectionGuard:
    """Refuse, and record, every socket connection and name lookup made while active."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def __enter__(self) -> "ConnectionGuard":
        self._saved = (socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo,
                       socket.create_connection)
        guard = self

        def refuse(what: str):
            def _refused(*args, **kwargs):
                target = args[1] if len(args) > 1 and what.startswith("socket.") else args[:2]
                guard.attempts.append(f"{what}{target!r}")
                raise OSError(f"portability check: no connection allowed ({what} {target!r})")
            return _refused

        socket.socket.connect = refuse("socket.connect")
        socket.socket.connect_ex = refuse("socket.connect_ex")
        socket.getaddrinfo = refuse("getaddrinfo")
        socket.create_connection = refuse("create_connection")
        return self

    def __exit__(self, *exc) -> None:
        (socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo,
         socket.create_connection) = self._saved


def _dbt(args: list[str]):
    from dbt.cli.main import dbtRunner

    return dbtRunner().invoke(args)


def render(project: Path, adapter: str) -> tuple[list[dict], list[dict], dict]:
    """Compile the project for `adapter`: (statements, failures, dispatch facts)."""
    common = ["--project-dir", str(project), "--profiles-dir", str(project)]
    result = _dbt(["compile", *common, "--target", adapter,
                   INTROSPECT.get(adapter, "--no-introspect"), "--no-populate-cache",
                   "--no-partial-parse", "--threads", "1", "--quiet"])
    if not result.success:
        detail = str(result.exception) if result.exception else ""
        for r in getattr(result.result, "results", None) or []:
            if str(r.status) not in ("success", "pass"):
                detail += f"\n{r.node.name}: {r.message}"
        return [], [{"adapter": adapter, "dialect": DIALECTS[adapter], "relation": "-",
                     "macro": "-", "error": f"dbt compile failed: {detail.strip()}"}], {}
    statements = []
    dispatch = {}
    for r in result.result.results:
        node = r.node
        if node.resource_type != "model" or node.package_name != "audsync_portability":
            continue
        if node.name == "do_not_contact":
            continue
        if node.name == "dispatch_order":
            dispatch = json.loads(node.compiled_code)
            continue
        sync = "-" if node.name == "state_tables" else node.name
        for item in json.loads(node.compiled_code):
            statements.append({"adapter": adapter, "dialect": DIALECTS[adapter], "sync": sync,
                               **item})
    return statements, [], dispatch


def _bigquery_lints(sql: str, trees: list) -> str | None:
    """What BigQuery refuses and sqlglot's BigQuery parser accepts (it reads the other
    dialects' forms too): the `%` operator (GoogleSQL has mod() only: sqlglot itself writes
    Mod as MOD() for BigQuery), and a WHERE in a select without FROM ("Query without FROM
    clause cannot have a WHERE clause")."""
    import sqlglot
    from sqlglot import exp
    from sqlglot.tokens import TokenType

    if any(t.token_type == TokenType.MOD for t in sqlglot.tokenize(sql, read="bigquery")):
        return "BigQuery has no % operator (GoogleSQL's modulo is mod(x, y))"
    for tree in trees:
        for select in tree.find_all(exp.Select):
            if select.args.get("where") is not None and select.args.get(_FROM) is None:
                return ("BigQuery refuses a WHERE in a select without FROM: "
                        f"{select.sql(dialect='bigquery')[:160]!r}")
    return None


# The key of a select's FROM in sqlglot's tree ("from_" since sqlglot 28, "from" before).
_FROM = "from_" if "from_" in __import__("sqlglot").exp.Select.arg_types else "from"

# Per dialect: what the warehouse refuses although sqlglot parses it.
LINTS = {"bigquery": _bigquery_lints}


def parse(statement: dict) -> str | None:
    """sqlglot's message when `statement` does not parse in its dialect (or a lint's, for what
    the warehouse refuses and sqlglot accepts), else None."""
    import sqlglot
    from sqlglot.errors import ErrorLevel

    try:
        trees = sqlglot.parse(statement["sql"], read=statement["dialect"],
                              error_level=ErrorLevel.RAISE)
    except Exception as exc:  # ParseError, TokenError: the message is the finding
        return f"{type(exc).__name__}: {exc}"
    trees = [t for t in trees if t is not None]
    if not trees:
        return "no statement parsed"
    # A statement sqlglot could not understand comes back as a raw Command: not a parse.
    commands = [t for t in trees if t.key == "command"]
    if commands:
        return f"parsed only as an opaque command: {commands[0].sql()[:120]!r}"
    lint = LINTS.get(statement["dialect"])
    return lint(statement["sql"], trees) if lint else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--adapters", default=",".join(DIALECTS))
    parser.add_argument("--override", type=Path, action="append", default=[])
    parser.add_argument("--output", type=Path, required=True, help="where the JSON report goes")
    args = parser.parse_args(argv)
    adapters = [a for a in args.adapters.split(",") if a]
    os.environ["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    os.environ.setdefault("DBT_LOG_PATH", str(args.work / "logs"))
    project = write_project(args.repo.resolve(), args.work, adapters, args.override)

    report = {"statements": [], "failures": [], "connections": [], "dispatch": {}}
    with ConnectionGuard() as guard:
        deps = _dbt(["deps", "--project-dir", str(project), "--profiles-dir", str(project),
                     "--quiet"])
        if not deps.success:
            report["failures"].append({"adapter": "-", "dialect": "-", "relation": "-",
                                       "macro": "-", "error": f"dbt deps failed: {deps.exception}"})
        else:
            for adapter in adapters:
                statements, failures, dispatch = render(project, adapter)
                report["statements"] += statements
                report["failures"] += failures
                report["dispatch"][adapter] = dispatch
    report["connections"] = guard.attempts
    for statement in report["statements"]:
        error = parse(statement)
        statement["parsed"] = error is None
        if error:
            report["failures"].append({k: statement[k] for k in
                                       ("adapter", "dialect", "sync", "relation", "macro")}
                                      | {"error": error, "sql": statement["sql"]})
    args.output.write_text(json.dumps(report, indent=1))
    ok = not report["failures"] and not report["connections"] and report["statements"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
