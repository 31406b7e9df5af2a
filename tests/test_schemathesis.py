"""schemathesis over the OpenAPI schema, against a real server: every operation, generated
requests valid and invalid, checked for no 5xx and for answers that match the schema (status,
content type, body, headers)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import live_server

EXAMPLES = int(os.environ.get("BLINK_SCHEMATHESIS_EXAMPLES", "15"))
pytestmark = pytest.mark.slow  # some 20 operations x EXAMPLES requests, and a server of its own


@pytest.fixture(scope="module")
def api_schema(bundle_dir) -> Iterator[schemathesis.schemas.BaseSchema]:
    with live_server(bundle_dir, threads=1, max_batch_size=4) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_api_matches_its_schema(case):
    # Every check but one: a body the schema calls valid (any bytes, `format: binary`) need not
    # be a decodable image, and top_k's upper bound is the served model's label count, which a
    # reload may change; those answers are 400 and 422, by design.
    case.call_and_validate(
        timeout=15, excluded_checks=[schemathesis.checks.positive_data_acceptance]
    )
