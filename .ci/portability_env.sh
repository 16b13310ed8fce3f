#!/usr/bin/env bash
# Make .venv-portability/: dbt-snowflake, dbt-bigquery and dbt-databricks (with dbt-spark)
# and sqlglot, pinned in tests/portability/requirements.txt, for the portability check
# (tests/portability/). Its own environment: these adapters are never audsync's dependencies.
# Nothing in it connects anywhere; pip reaches only the package registry. Idempotent: an env
# whose pins already match is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
env_dir=${AUDSYNC_PORTABILITY_ENV:-.venv-portability}
requirements=tests/portability/requirements.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
stamp="$env_dir/.audsync-requirements"
if [ -x "$env_dir/bin/python" ] && [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; then
    echo "portability env: $env_dir is up to date"
    exit 0
fi
rm -rf "$env_dir"
"$PYTHON" -m venv "$env_dir"
"$env_dir/bin/python" -m pip install --quiet -r "$requirements"
cp "$requirements" "$stamp"
echo "portability env: $env_dir made ($("$env_dir/bin/python" -c 'from importlib.metadata import version as v; print(*(p + " " + v(p) for p in ("dbt-core", "dbt-snowflake", "dbt-bigquery", "dbt-databricks", "dbt-spark", "sqlglot")), sep=", ")'))"
