"""Every connector, every mode: the property of contract section 4 against its fake server.

Real dbt on DuckDB builds the syncs, the real CLI runs them through the real engine, and
each fake server checks requests as its API would and keeps the destination's state. After
each failure-free run the destination must hold what the sync's mode promises.
"""

from __future__ import annotations

import importlib
import random

import pytest

from tests.support.dbt_project import DbtProject
from tests.support.syncs import ModeOracle, audsync, run_rows, valid_members, write_audience, write_destinations, write_sync

MODES = ("mirror", "add", "upsert", "remove")
FAKES = {
    "facebook_custom_audience": "tests.fakes.facebook:FakeFacebook",
    "google_customer_match": "tests.fakes.google:FakeGoogle",
    "hubspot_list": "tests.fakes.hubspot:FakeHubSpot",
    "salesforce_campaign": "tests.fakes.salesforce:FakeSalesforce",
    "braze": "tests.fakes.braze:FakeBraze",
    "mailchimp": "tests.fakes.mailchimp:FakeMailchimp",
    "klaviyo_list": "tests.fakes.klaviyo:FakeKlaviyo",
}
# Never null: Salesforce maps first_name to Contact.LastName, which it requires.
FIRST_NAMES = ["Ann", "Bob", "Zoë", "O'Brien", "Li"]


def fake_class(type_name: str):
    module, _, cls = FAKES[type_name].partition(":")
    return getattr(importlib.import_module(module), cls)


def audience(rng: random.Random) -> list[tuple]:
    return [(f"member{rng.randint(0, 30)}@example.com", rng.choice(FIRST_NAMES), float(rng.randint(1, 500)))
            for _ in range(rng.randint(0, 18))]


def comparable(value):
    """Destinations keep values as they like (HubSpot as strings): compare by text."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def values_of(mapping):
    by_source = {m["source_column"]: m["destination_field"] for m in mapping}

    def to_values(fields):
        kept = [by_source[c] for c in ("first_name", "ltv") if c in by_source and by_source[c] in fields]
        if not fields or not kept:
            return None
        return tuple(comparable(fields.get(by_source.get(c))) if c in by_source else None for c in ("first_name", "ltv"))

    def expected(values):
        return tuple(comparable(v) if c in by_source else None for c, v in zip(("first_name", "ltv"), values))

    return to_values, expected


@pytest.mark.parametrize("type_name", sorted(FAKES))
def test_every_mode_holds_against_the_fake(tmp_path, type_name):
    rng = random.Random(type_name)
    project = DbtProject(tmp_path / "proj", "duckdb")
    cls = fake_class(type_name)
    fakes = {mode: cls().__enter__() for mode in MODES}
    try:
        mapping = fakes["mirror"].field_mapping()
        initial = {f"member{i}@example.com": {} for i in range(0, 31, 4)}
        fakes["remove"].seed_members({k: {} for k in initial})
        oracles = {m: ModeOracle(m, initial if m == "remove" else None) for m in MODES}
        destinations = {}
        for mode, fake in fakes.items():
            destinations[f"dest_{mode}"] = fake.destination_config()
            write_sync(project, f"sync_{mode}", mode=mode, destination=f"dest_{mode}",
                       mapping=fake.field_mapping(), config=fake.sync_config() or None, tags=["all"])
        write_destinations(project, destinations)
        to_values, expected_values = values_of(mapping)
        candidates = [f"member{i}@example.com" for i in range(31)]
        for step in range(3):
            state = audience(rng)
            write_audience(project, state)
            project.dbt("run")
            audsync(project, "run", "--select", "tag:all")
            members = {k: expected_values(v) for k, v in valid_members(state).items()}
            for mode, fake in fakes.items():
                oracles[mode].observe(members)
                oracles[mode].check(fake.members(candidates), to_values)
                assert getattr(fake, "violations", []) == [], (mode, fake.violations)
                assert run_rows(project, f"sync_{mode}")[-1]["status"] == "success"
    finally:
        for fake in fakes.values():
            fake.__exit__(None, None, None)
