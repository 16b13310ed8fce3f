"""Identifier normalisation and hashing, declared once for every destination that needs it.

Ad platforms match people on hashed identifiers: the same person must give the same hash on
every run and on every path (add, update, remove), so each rule is written once here and the
connectors only pick rules by name. The rules follow the design's destinations.md
("Normalise, then hash"); where the platforms' own helper code (Meta's ``facebook-business``
SDK, Google's ``google-ads-datamanager-util``) does something else, the tests in
``tests/unit/test_identifiers.py`` hold the difference on record
(``tests/data/tricky_identifiers.json``).

Shared rules:

* a value that already is 64 hexadecimal characters is taken as a SHA-256 hash made upstream
  (a warehouse that stores only hashes) and is passed through, lowercased, never hashed twice;
* text is put in Unicode NFC form before anything else, so that "é" typed as one code point or
  as "e" plus a combining accent hashes the same;
* a value that cannot be normalised raises :class:`InvalidIdentifier` with a code
  (``invalid_email``, ``invalid_phone``, ...) and a message that never quotes the value: the
  message ends up in ``audsync_row_errors``, and the value is personal data.

Phones are parsed with ``phonenumbers`` (Google's libphonenumber): E.164 is what both platforms
want, Meta without the ``+``, Google with it. A national number needs ``default_country``.

Google's gmail rule is always on for Google (destinations.md, "Corrections"): for gmail.com and
googlemail.com, dots before ``@`` and any ``+suffix`` are removed before hashing, as Google's
``Formatter`` does. There is no setting to turn it off: without it every gmail address with a
dot or a plus hashes differently from the user's Google account and loses its match.

Meta's email rule strips leading and trailing dots as well as whitespace, as the
``facebook-business`` SDK does; its state rule turns US state names into their two-letter
codes (Meta's documented rule: "use the 2-character ANSI abbreviation code").
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Mapping

import phonenumbers

# ----------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------

SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
"""A value that already is a SHA-256 hash (hex)."""

GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})

_WHITESPACE = re.compile(r"\s")


class InvalidIdentifier(ValueError):
    """A value that cannot be normalised; ``code`` names the kind (``invalid_email``, ...).

    The message says what is wrong without quoting the value (personal data).
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Options:
    """Settings that change how values are normalised."""

    default_country: str | None = None
    """ISO 3166 alpha-2 region of phone numbers written without a country code (``GB``)."""
    gmail: bool = False
    """Drop dots and ``+suffix`` from the local part of gmail.com / googlemail.com addresses.

    Google's rules ignore it (they always apply the gmail rule); kept for callers of
    :func:`normalize_email` that choose."""


def sha256_hex(text: str) -> str:
    """SHA-256 of ``text`` (UTF-8) as lowercase hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_hashed(value: Any) -> bool:
    """Whether ``value`` already is a SHA-256 hex digest (64 hex characters, spaces around ok)."""
    return isinstance(value, str) and bool(SHA256_HEX.match(value.strip()))


def is_region(code: Any) -> bool:
    """Whether ``code`` is an ISO 3166 alpha-2 region that phone numbers can belong to."""
    return isinstance(code, str) and code.strip().upper() in phonenumbers.SUPPORTED_REGIONS


def is_blank(value: Any) -> bool:
    """``None``, or text that is empty or only whitespace: a value that was not given."""
    return value is None or (isinstance(value, str) and not value.strip())


def as_text(value: Any) -> str:
    """A warehouse value as text: integral numbers without a trailing ``.0``, text NFC-normalised.

    A phone or zip read from a numeric column arrives as ``int``, ``float`` or ``Decimal``;
    ``str(16505551234.0)`` would add a digit.
    """
    if isinstance(value, bool):
        raise InvalidIdentifier("invalid_value", "a boolean is not an identifier")
    if isinstance(value, float):
        if not value.is_integer():
            return repr(value)
        return str(int(value))
    if isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value():
            return str(int(value))
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    return unicodedata.normalize("NFC", str(value))


def mailchimp_subscriber_hash(email: str) -> str:
    """Mailchimp's ``subscriber_hash``: MD5 hex of the lowercased email (spaces around dropped).

    Mailchimp stores addresses without surrounding whitespace, so the hash of " A@b.com" must be
    the hash of "a@b.com" for the member to be found.
    """
    text = as_text(email).strip().lower()
    # MD5 names a record here; it protects nothing (``usedforsecurity=False`` keeps FIPS builds
    # of OpenSSL from refusing it).
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


# ----------------------------------------------------------------------------------------
# Normalisers (text in, normalised text out; InvalidIdentifier when impossible)
# ----------------------------------------------------------------------------------------


def normalize_email(value: Any, *, gmail: bool = False, strip_dots: bool = False) -> str:
    """Trim and lowercase an email; with ``gmail``, drop dots and ``+suffix`` on gmail domains;
    with ``strip_dots``, drop dots at both ends first (Meta's SDK strips them with the spaces).

    Rejected: empty, whitespace inside, not exactly one ``@``, an empty local part or domain
    (the checks of Google's ``Formatter.format_email_address``).
    """
    text = as_text(value).strip()
    if strip_dots:
        # The SDK strips " \t\r\n\0\x0B." together: dots inside surrounding spaces go too.
        text = text.strip(" \t\r\n\0\x0b.")
    if not text:
        raise InvalidIdentifier("invalid_email", "the email is empty")
    if _WHITESPACE.search(text):
        raise InvalidIdentifier("invalid_email", "the email contains whitespace")
    text = text.lower()
    local, at, domain = text.partition("@")
    if not at or "@" in domain:
        raise InvalidIdentifier("invalid_email", "the email must contain exactly one '@'")
    if not local or not domain:
        raise InvalidIdentifier("invalid_email", "the email has an empty name or domain")
    if gmail and domain in GMAIL_DOMAINS:
        local = local.split("+", 1)[0].replace(".", "")
        if not local:
            raise InvalidIdentifier("invalid_email", "the gmail address is empty once normalised")
    return f"{local}@{domain}"


def normalize_phone(value: Any, *, default_country: str | None = None) -> str:
    """A phone number in E.164 (``+442079460958``).

    * ``+`` first: international, parsed as written (a ``(0)`` trunk prefix is dropped).
    * ``default_country`` set: parsed as a number of that region (national forms, the region's
      international dialling prefix, and digits that start with the country code all work).
    * neither: ``00`` first is read as ``+``; other digits are taken as international only if
      they form a *valid* number with a ``+`` in front (``16505551234``), since nothing else
      says where the number is; otherwise the number is rejected.

    A number must have a possible length for its region; extensions are dropped.
    """
    text = as_text(value).strip()
    if not text:
        raise InvalidIdentifier("invalid_phone", "the phone number is empty")
    region = default_country.strip().upper() if default_country else None
    if region and region not in phonenumbers.SUPPORTED_REGIONS:
        raise InvalidIdentifier(
            "invalid_phone", f"default_country {region!r} is not an ISO 3166 region code"
        )
    strict = False
    if not text.startswith("+") and not region:
        digits = re.sub(r"\D", "", text)
        if not digits:
            raise InvalidIdentifier("invalid_phone", "the phone number has no digits")
        if digits.startswith("00"):
            text = "+" + digits[2:]
        else:
            # Only a guess: accept it when the digits make a valid number with a country code.
            text = "+" + digits
            strict = True
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        raise InvalidIdentifier(
            "invalid_phone",
            "the phone number cannot be parsed"
            + ("" if region else "; write it with its country code (+...) or set default_country"),
        ) from None
    if strict:
        if not phonenumbers.is_valid_number(number):
            raise InvalidIdentifier(
                "invalid_phone",
                "the phone number has no country code; write it as +<country code><number>"
                " or set default_country",
            )
    elif (
        phonenumbers.is_possible_number_with_reason(number)
        != phonenumbers.ValidationResult.IS_POSSIBLE
    ):
        raise InvalidIdentifier("invalid_phone", "the phone number has an impossible length")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _letters_only(value: Any, code: str, what: str) -> str:
    """Lowercase letters of ``value`` (any script), everything else dropped."""
    text = "".join(ch for ch in as_text(value).strip().lower() if ch.isalpha())
    if not text:
        raise InvalidIdentifier(code, f"the {what} has no letters")
    return text


def _trimmed(value: Any, code: str, what: str) -> str:
    text = as_text(value).strip()
    if not text:
        raise InvalidIdentifier(code, f"the {what} is empty")
    return text


def _trim_lower(value: Any, code: str, what: str) -> str:
    text = as_text(value).strip().lower()
    if not text:
        raise InvalidIdentifier(code, f"the {what} is empty")
    return text


def normalize_zip(value: Any) -> str:
    """Meta's ZIP: lowercase, no whitespace, the part before a ``-`` (``94025-1234``: ``94025``)."""
    text = re.sub(r"\s", "", as_text(value).lower()).split("-", 1)[0]
    if not text:
        raise InvalidIdentifier("invalid_zip", "the zip code is empty")
    return text


def normalize_country(value: Any) -> str:
    """An ISO 3166-1 alpha-2 code, uppercase (``us``, ``U.S.`` -> ``US``).

    Only a known two-letter region is accepted: cutting ``AUT`` (Austria) to ``AU`` (Australia),
    as a naive rule would, sends a wrong value that still looks right.
    """
    letters = re.sub(r"[^A-Za-z]", "", as_text(value)).upper()
    if len(letters) != 2 or letters not in phonenumbers.SUPPORTED_REGIONS:
        raise InvalidIdentifier("invalid_country", "the country is not an ISO 3166 alpha-2 code")
    return letters


_GENDERS = {"m": "m", "male": "m", "man": "m", "f": "f", "female": "f", "woman": "f"}


def normalize_gender(value: Any) -> str:
    """``m`` or ``f`` (from m/male/man, f/female/woman, any case)."""
    text = as_text(value).strip().lower()
    if text not in _GENDERS:
        raise InvalidIdentifier("invalid_gender", "the gender is not one of m, f, male, female")
    return _GENDERS[text]


def _date_part(value: Any, part: str) -> int:
    """Year, month or day of a date value, or of the digits of text."""
    if isinstance(value, (_dt.date, _dt.datetime)):
        return getattr(value, part)
    digits = re.sub(r"\D", "", as_text(value))
    if not digits:
        raise InvalidIdentifier(f"invalid_birth_{part}", f"the birth {part} has no digits")
    return int(digits)


def normalize_birth_year(value: Any) -> str:
    """``YYYY``."""
    year = _date_part(value, "year")
    if not 1000 <= year <= 9999:
        raise InvalidIdentifier("invalid_birth_year", "the birth year is not four digits")
    return f"{year:04d}"


def normalize_birth_month(value: Any) -> str:
    """``MM``, 01 to 12."""
    month = _date_part(value, "month")
    if not 1 <= month <= 12:
        raise InvalidIdentifier("invalid_birth_month", "the birth month is not 1 to 12")
    return f"{month:02d}"


def normalize_birth_day(value: Any) -> str:
    """``DD``, 01 to 31."""
    day = _date_part(value, "day")
    if not 1 <= day <= 31:
        raise InvalidIdentifier("invalid_birth_day", "the birth day is not 1 to 31")
    return f"{day:02d}"


# ----------------------------------------------------------------------------------------
# Rules: what each destination field becomes
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How one destination field is normalised, and whether it is then hashed."""

    name: str
    code: str
    """The error code of a value that cannot be normalised (``invalid_email``)."""
    normalize: Callable[[Any, Options], str]
    hashed: bool = True

    def apply(self, value: Any, options: Options = Options()) -> str:
        """The value to send: normalised, then SHA-256 hex when ``hashed``.

        A hashed rule passes a value that already is a SHA-256 hex digest through, lowercased.

        Raises:
            InvalidIdentifier: the value is blank or cannot be normalised.
        """
        if self.hashed and is_hashed(value):
            return value.strip().lower()
        if is_blank(value):
            raise InvalidIdentifier(self.code, f"the {self.name} value is empty")
        normalized = self.normalize(value, options)
        return sha256_hex(normalized) if self.hashed else normalized

    def normalized(self, value: Any, options: Options = Options()) -> str:
        """The normalised value before hashing (for tests and previews)."""
        return self.normalize(value, options)


US_STATES: Mapping[str, str] = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "districtofcolumbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi", "minnesota": "mn",
    "mississippi": "ms", "missouri": "mo", "montana": "mt", "nebraska": "ne", "nevada": "nv",
    "newhampshire": "nh", "newjersey": "nj", "newmexico": "nm", "newyork": "ny",
    "northcarolina": "nc", "northdakota": "nd", "ohio": "oh", "oklahoma": "ok", "oregon": "or",
    "pennsylvania": "pa", "rhodeisland": "ri", "southcarolina": "sc", "southdakota": "sd",
    "tennessee": "tn", "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va",
    "washington": "wa", "westvirginia": "wv", "wisconsin": "wi", "wyoming": "wy",
    "puertorico": "pr", "guam": "gu", "americansamoa": "as", "virginislands": "vi",
    "usvirginislands": "vi", "northernmarianaislands": "mp",
}  # fmt: skip
"""US state and territory names (lowercase letters only) -> their two-letter ANSI code."""


def normalize_state(value: Any) -> str:
    """Meta's ST: lowercase letters only, a US state's name turned into its two-letter code
    (``California`` -> ``ca``); other regions' states stay as their letters."""
    letters = _letters_only(value, "invalid_st", "state")
    return US_STATES.get(letters, letters)


def _meta_phone(value: Any, options: Options) -> str:
    # Meta: E.164 digits, no '+'.
    return normalize_phone(value, default_country=options.default_country).lstrip("+")


def _first_initial(value: Any, options: Options) -> str:
    return _letters_only(value, "invalid_fi", "first initial")[0]


META_RULES: Mapping[str, Rule] = {
    "EMAIL": Rule("EMAIL", "invalid_email", lambda v, o: normalize_email(v, strip_dots=True)),
    "PHONE": Rule("PHONE", "invalid_phone", _meta_phone),
    "FN": Rule("FN", "invalid_fn", lambda v, o: _letters_only(v, "invalid_fn", "first name")),
    "LN": Rule("LN", "invalid_ln", lambda v, o: _letters_only(v, "invalid_ln", "last name")),
    "FI": Rule("FI", "invalid_fi", _first_initial),
    "GEN": Rule("GEN", "invalid_gender", lambda v, o: normalize_gender(v)),
    "DOBY": Rule("DOBY", "invalid_birth_year", lambda v, o: normalize_birth_year(v)),
    "DOBM": Rule("DOBM", "invalid_birth_month", lambda v, o: normalize_birth_month(v)),
    "DOBD": Rule("DOBD", "invalid_birth_day", lambda v, o: normalize_birth_day(v)),
    "CT": Rule("CT", "invalid_ct", lambda v, o: _letters_only(v, "invalid_ct", "city")),
    "ST": Rule("ST", "invalid_st", lambda v, o: normalize_state(v)),
    "ZIP": Rule("ZIP", "invalid_zip", lambda v, o: normalize_zip(v)),
    "COUNTRY": Rule("COUNTRY", "invalid_country", lambda v, o: normalize_country(v).lower()),
    # Device ids and the advertiser's own ids are sent in clear (destinations.md).
    "MADID": Rule(
        "MADID",
        "invalid_madid",
        lambda v, o: _trim_lower(v, "invalid_madid", "mobile ad id"),
        hashed=False,
    ),
    "EXTERN_ID": Rule("EXTERN_ID", "invalid_extern_id", lambda v, o: _extern_id(v), hashed=False),
}
"""Meta Custom Audiences multi-key schema: key name -> rule (destinations.md, Meta section)."""


def _extern_id(value: Any) -> str:
    # "As is" (destinations.md): the advertiser's own id must equal the one its other uploads
    # (pixel, conversions API) carry, so not even surrounding spaces are touched.
    text = as_text(value)
    if not text.strip():
        raise InvalidIdentifier("invalid_extern_id", "the external id is empty")
    return text


GOOGLE_RULES: Mapping[str, Rule] = {
    # The gmail rule always: Google's own Formatter applies it to every address.
    "email_address": Rule(
        "email_address", "invalid_email", lambda v, o: normalize_email(v, gmail=True)
    ),
    "phone_number": Rule(
        "phone_number",
        "invalid_phone",
        lambda v, o: normalize_phone(v, default_country=o.default_country),
    ),
    "given_name": Rule(
        "given_name",
        "invalid_given_name",
        lambda v, o: _trim_lower(v, "invalid_given_name", "given name"),
    ),
    "family_name": Rule(
        "family_name",
        "invalid_family_name",
        lambda v, o: _trim_lower(v, "invalid_family_name", "family name"),
    ),
    # Region and postal code are sent in clear (destinations.md; AddressInfo in the API), the
    # postal code only trimmed, as Google's Formatter.format_postal_code does.
    "region_code": Rule(
        "region_code", "invalid_country", lambda v, o: normalize_country(v), hashed=False
    ),
    "postal_code": Rule(
        "postal_code",
        "invalid_postal_code",
        lambda v, o: _trimmed(v, "invalid_postal_code", "postal code"),
        hashed=False,
    ),
}
"""Google Customer Match (Data Manager API) user identifiers: field -> rule."""


def meta_value(key: str, value: Any, options: Options = Options()) -> str:
    """What Meta's multi-key schema column ``key`` gets for ``value`` (hashed where required)."""
    return META_RULES[key].apply(value, options)


def google_value(field: str, value: Any, options: Options = Options()) -> str:
    """What a Data Manager user identifier ``field`` gets for ``value`` (hashed where required)."""
    return GOOGLE_RULES[field].apply(value, options)
