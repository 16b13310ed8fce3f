"""Property-based fuzzing of ``audsync serve`` from its own OpenAPI document (schemathesis).

Every operation gets a bounded number of generated requests (valid and invalid bodies,
parameters and headers) against the real service on the example project. Each answer must be
no 5xx, have a documented status code and content type, and match the documented schema;
errors have the one error shape. The long form's ``workspace_id`` is set to the real
workspace most of the time, so that requests reach past the workspace lookup.
"""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.dbt_project import DbtProject
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token-0123456789"
EXAMPLES_PER_OPERATION = 12
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The example project with its state tables only: one small dbt run (the service reads
    the rest from the manifest)."""
    project = DbtProject.from_example("jaffle_audiences", tmp_path_factory.mktemp("fuzz") / "shop", "duckdb")
    project.dbt("run", "--select", "package:audsync")
    return project


def test_the_api_answers_every_generated_request_as_documented(project):
    workspace = str(uuid.uuid5(uuid.NAMESPACE_URL, "audsync:workspace:jaffle_audiences:duckdb"))
    with ServiceProcess(project, "--no-scheduler", "--rate-limit", "100000", env={"AUDSYNC_API_TOKEN": TOKEN}) as service:
        schema = schemathesis.openapi.from_url(service.base_url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 20  # ten endpoints, each in the long and the short form
        seen_statuses: set[int] = set()
        for operation in operations:
            _fuzz(operation, service.base_url, workspace, seen_statuses)
        # The fuzzing reached real answers, not only the workspace lookup.
        assert {200, 404, 422} <= seen_statuses, seen_statuses
        assert "Traceback" not in service.log and " 500 " not in service.log


def _fuzz(operation, base_url: str, workspace: str, seen: set[int]) -> None:
    @given(case=operation.as_strategy(), real_workspace=st.booleans())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def check(case, real_workspace):
        if real_workspace and case.path_parameters and "workspace_id" in case.path_parameters:
            case.path_parameters["workspace_id"] = workspace
            if case.headers:
                case.headers.pop("X-Workspace-ID", None)
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        seen.add(response.status_code)
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            assert set(response.json()) == {"error"} and {"code", "message"} <= set(response.json()["error"])

    check()
