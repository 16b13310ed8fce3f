"""Identifier normalisation and hashing, against the tricky-input table and the vendors' helpers.

The table (``tests/data/tricky_identifiers.json``) states what we send for each input. The
vendors' own helpers are the oracles: Meta's ``facebook-business`` SDK
(``CustomAudienceMixin.format_params``) and Google's ``google-ads-datamanager-util``
(``Formatter``). Where a row says ``same`` the helper must give our exact output; where it says
``differs`` the helper must give something else (so the note explaining why stays true); where
it says ``rejects`` the helper must refuse the value as we do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from decimal import Decimal
from pathlib import Path

import pytest
from facebook_business.adobjects.helpers.customaudiencemixin import CustomAudienceMixin
from google.ads.datamanager_util import Encoding, Formatter

from audsync import identifiers as ids
from audsync.identifiers import GOOGLE_RULES, META_RULES, InvalidIdentifier, Options

TABLE = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "tricky_identifiers.json").read_text("utf-8")
)
ROWS = TABLE["rows"]
META_ROWS = [r for r in ROWS if r.get("meta_key")]
GOOGLE_ROWS = [r for r in ROWS if r.get("google_field")]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _final(row: dict, expected: str | None, hashed: bool) -> str | None:
    """What the row's expected normalised value becomes on the wire."""
    if expected is None or row.get("hashed_input") or not hashed:
        return expected
    return _sha(expected)


def _ours(rule, row: dict, *, gmail: bool = False) -> str | None:
    options = Options(default_country=row.get("default_country"), gmail=gmail)
    try:
        return rule.apply(row["input"], options)
    except InvalidIdentifier:
        return None


# ----------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------


def test_table_is_well_formed():
    assert len({r["id"] for r in ROWS}) == len(ROWS), "row ids must be unique"
    for row in ROWS:
        assert row.get("meta_key") in (None, *META_RULES), row["id"]
        assert row.get("google_field") in (None, *GOOGLE_RULES), row["id"]
        assert row.get("meta_sdk") in (None, "same", "differs", "n/a"), row["id"]
        assert row.get("google_util") in (None, "same", "differs", "rejects", "n/a"), row["id"]
    # The brief's kinds of tricky input are all there.
    kinds = " ".join(r["id"] for r in ROWS)
    for needed in (
        "case",
        "plus",
        "gmail",
        "googlemail",
        "idd",
        "national",
        "trunk-zero",
        "italy-leading-zero",
        "prehashed",
        "empty",
        "junk",
    ):
        assert needed in kinds, needed


@pytest.mark.parametrize("row", META_ROWS, ids=[r["id"] for r in META_ROWS])
def test_meta_rule_gives_the_table_value(row):
    rule = META_RULES[row["meta_key"]]
    assert _ours(rule, row) == _final(row, row["meta"], rule.hashed)


@pytest.mark.parametrize("row", GOOGLE_ROWS, ids=[r["id"] for r in GOOGLE_ROWS])
def test_google_rule_gives_the_table_value(row):
    rule = GOOGLE_RULES[row["google_field"]]
    assert _ours(rule, row) == _final(row, row["google"], rule.hashed)
    # The gmail rule is always on: the option (kept for other callers) cannot turn it off.
    assert _ours(rule, row, gmail=False) == _ours(rule, row, gmail=True)


# ----------------------------------------------------------------------------------------
# The oracles
# ----------------------------------------------------------------------------------------


def _meta_sdk(row: dict) -> str:
    """What Meta's SDK sends for the row's input in a one-key multi-key schema."""
    value = row["input"] if isinstance(row["input"], str) else str(row["input"])
    params = CustomAudienceMixin.format_params(
        [row["meta_key"]], [[value]], is_raw=True, pre_hashed=bool(row.get("hashed_input"))
    )
    return params["payload"]["data"][0][0]


META_ORACLE_ROWS = [r for r in META_ROWS if r["meta_sdk"] in ("same", "differs")]


@pytest.mark.parametrize("row", META_ORACLE_ROWS, ids=[r["id"] for r in META_ORACLE_ROWS])
def test_meta_sdk_oracle(row):
    ours = _ours(META_RULES[row["meta_key"]], row)
    assert ours is not None
    if row["meta_sdk"] == "same":
        assert _meta_sdk(row) == ours
    else:
        assert _meta_sdk(row) != ours, f"the SDK now agrees on {row['id']}: update the table"


_UTIL = Formatter()
_UTIL_CALLS = {
    "email_address": lambda v: _UTIL.process_email_address(v, Encoding.HEX),
    "phone_number": lambda v: _UTIL.process_phone_number(v, Encoding.HEX),
    "given_name": lambda v: _UTIL.process_given_name(v, Encoding.HEX),
    "family_name": lambda v: _UTIL.process_family_name(v, Encoding.HEX),
    "postal_code": _UTIL.process_postal_code,
    "region_code": _UTIL.process_region_code,
}
GOOGLE_ORACLE_ROWS = [r for r in GOOGLE_ROWS if r["google_util"] != "n/a"]


@pytest.mark.parametrize("row", GOOGLE_ORACLE_ROWS, ids=[r["id"] for r in GOOGLE_ORACLE_ROWS])
def test_google_util_oracle(row):
    field = row["google_field"]
    value = row["input"] if isinstance(row["input"], str) else str(row["input"])
    # Google's helper always applies the gmail rule, and so do we.
    ours = _ours(GOOGLE_RULES[field], row)
    if row["google_util"] == "rejects":
        assert ours is None
        with pytest.raises(ValueError):
            _UTIL_CALLS[field](value)
        return
    assert ours is not None
    if row["google_util"] == "same":
        assert _UTIL_CALLS[field](value) == ours
    else:
        try:
            theirs = _UTIL_CALLS[field](value)
        except ValueError:
            theirs = None
        assert theirs != ours, f"Google's helper now agrees on {row['id']}: update the table"


# ----------------------------------------------------------------------------------------
# Rules beyond the table
# ----------------------------------------------------------------------------------------


def test_gmail_rule_is_always_on_for_google_and_off_for_meta():
    for address in ("John.Smith+ads@Gmail.com", "j.o.h.n+x@googlemail.com"):
        local = address.lower().split("@")[0].split("+")[0].replace(".", "")
        domain = address.lower().split("@")[1]
        assert ids.google_value("email_address", address) == _sha(f"{local}@{domain}")
        assert ids.google_value("email_address", address) == _UTIL.process_email_address(
            address, Encoding.HEX
        )
        assert ids.meta_value("EMAIL", address) == _sha(address.lower())
    # Other domains keep dots and plus-addressing.
    assert ids.google_value("email_address", "a.b+c@example.com") == _sha("a.b+c@example.com")


def test_meta_states_and_email_dots():
    assert META_RULES["ST"].normalized("California") == "ca"
    assert META_RULES["ST"].normalized("district of columbia") == "dc"
    assert META_RULES["ST"].normalized("Ontario") == "ontario"
    assert META_RULES["EMAIL"].normalized("..dana@example.com.") == "dana@example.com"
    # Only Meta strips the dots; Google's helper keeps them, and so does our Google rule.
    assert GOOGLE_RULES["email_address"].normalized("dana@example.com.") == "dana@example.com."


def test_rejections_carry_a_code_and_never_the_value():
    rejected = 0
    for row in ROWS:
        for rules, name, expected in (
            (META_RULES, row.get("meta_key"), row.get("meta", "")),
            (GOOGLE_RULES, row.get("google_field"), row.get("google", "")),
        ):
            if not name or expected is not None:
                continue
            with pytest.raises(InvalidIdentifier) as caught:
                rules[name].apply(row["input"], Options(default_country=row.get("default_country")))
            rejected += 1
            assert caught.value.code.startswith("invalid_")
            text = str(row["input"]).strip()
            if text:
                assert text not in caught.value.message, row["id"]
    assert rejected >= 20


def test_key_error_codes():
    with pytest.raises(InvalidIdentifier) as email:
        META_RULES["EMAIL"].apply("nobody")
    assert email.value.code == "invalid_email"
    with pytest.raises(InvalidIdentifier) as phone:
        GOOGLE_RULES["phone_number"].apply("650 555 1234")
    assert phone.value.code == "invalid_phone"
    assert "default_country" in phone.value.message
    with pytest.raises(InvalidIdentifier) as blank:
        GOOGLE_RULES["email_address"].apply("  ")
    assert blank.value.code == "invalid_email"


def test_meta_and_google_phones_differ_only_by_the_plus():
    meta = META_RULES["PHONE"].normalized("+1 650 555 1234", Options())
    google = GOOGLE_RULES["phone_number"].normalized("+1 650 555 1234", Options())
    assert (meta, google) == ("16505551234", "+16505551234")
    assert ids.meta_value("PHONE", "+1 650 555 1234") == _sha("16505551234")
    assert ids.google_value("phone_number", "+1 650 555 1234") == _sha("+16505551234")


def test_unknown_default_country_is_rejected():
    with pytest.raises(InvalidIdentifier, match="default_country"):
        ids.normalize_phone("020 7946 0958", default_country="UK")  # the ISO code is GB
    assert ids.normalize_phone("020 7946 0958", default_country="gb") == "+442079460958"


def test_numeric_column_values():
    assert ids.as_text(16505551234.0) == "16505551234"
    assert ids.as_text(Decimal("447911123456")) == "447911123456"
    assert ids.as_text(Decimal("12.50")) == "12.50"
    assert ids.meta_value("PHONE", 16505551234.0) == _sha("16505551234")
    with pytest.raises(InvalidIdentifier):
        ids.as_text(True)


def test_date_parts_from_dates():
    born = dt.date(1985, 3, 7)
    assert ids.normalize_birth_year(born) == "1985"
    assert ids.normalize_birth_month(born) == "03"
    assert ids.normalize_birth_day(dt.datetime(1985, 3, 7, 12)) == "07"


def test_already_hashed_is_not_hashed_twice_but_only_for_hashed_rules():
    digest = _sha("dana@example.com")
    assert ids.is_hashed(digest) and ids.is_hashed(" " + digest.upper())
    assert not ids.is_hashed(digest[:-1]) and not ids.is_hashed(digest + "0")
    assert META_RULES["EMAIL"].apply(digest.upper()) == digest
    assert META_RULES["FN"].apply(digest) == digest
    # An external id that happens to be 64 hex characters is still sent as is.
    assert META_RULES["EXTERN_ID"].apply(digest.upper()) == digest.upper()


def test_mailchimp_subscriber_hash():
    expected = hashlib.md5(b"urist.mcvankab@freddiesjokes.com").hexdigest()
    assert ids.mailchimp_subscriber_hash("Urist.McVankab@freddiesjokes.com") == expected
    assert ids.mailchimp_subscriber_hash("  URIST.MCVANKAB@FREDDIESJOKES.COM ") == expected
    assert len(expected) == 32 and expected != _sha("urist.mcvankab@freddiesjokes.com")[:32]
