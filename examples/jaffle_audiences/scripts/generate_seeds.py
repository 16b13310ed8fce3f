"""Generate the example's seeds: ``seeds/raw_customers.csv`` and ``seeds/raw_orders.csv``.

Deterministic (a fixed random seed), so the committed CSVs are exactly what this prints:

    python scripts/generate_seeds.py          # rewrite the seeds
    python scripts/generate_seeds.py --check  # exit 1 if the committed seeds differ

The data is made to show audsync at work: ~200 customers with phones in mixed formats, a few
with a missing or shared email (they land in each sync's ``__invalid`` relation), and ~1,000
orders over 120 days, so moving ``as_of_date`` forward moves customers in and out of the
audiences and changes their lifetime value.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

SEEDS = Path(__file__).resolve().parent.parent / "seeds"

N_CUSTOMERS = 200
N_ORDERS = 1000
FIRST_ORDER_DAY = date(2026, 7, 1)
DAYS = 120  # orders from 2026-07-01 to 2026-10-28; as_of_date defaults to the last day - 30

FIRST_NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jon",
    "Kai",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Vera",
    "Wei",
    "Yara",
    "Zoe",
]
LAST_NAMES = [
    "Adams",
    "Bauer",
    "Costa",
    "Dubois",
    "Evans",
    "Fischer",
    "Garcia",
    "Hansen",
    "Ito",
    "Jensen",
    "Khan",
    "Larsen",
    "Moreau",
    "Novak",
    "Okafor",
    "Petrov",
    "Rossi",
    "Silva",
    "Tanaka",
    "Weber",
]
# Reserved example domains only.
DOMAINS = ["example.com", "example.org", "example.net", "mail.example.com"]
COUNTRIES = [
    ("US", 1),
    ("US", 1),
    ("US", 1),
    ("GB", 44),
    ("DE", 49),
    ("FR", 33),
    ("CA", 1),
    ("AU", 61),
]


def phone(rng: random.Random, calling_code: int) -> str:
    """A fictional phone number in one of the formats people type."""
    area, line = rng.randint(200, 989), rng.randint(100, 199)  # 555-01xx: fictional numbers
    style = rng.randrange(6)
    if style == 0:
        return f"+{calling_code} {area} 555 0{line}"
    if style == 1:
        return f"({area}) 555-0{line}"
    if style == 2:
        return f"{area}.555.0{line}"
    if style == 3:
        return f"00{calling_code}{area}5550{line}"
    if style == 4:
        return f"+{calling_code}-{area}-555-0{line}"
    return ""  # no phone given


def customers(rng: random.Random) -> list[dict]:
    rows = []
    for cid in range(1, N_CUSTOMERS + 1):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        country, code = rng.choice(COUNTRIES)
        email = f"{first}.{last}{cid}@{rng.choice(DOMAINS)}".lower()
        if rng.random() < 0.15:  # people type their email with capitals and spaces
            email = f" {first}.{last}{cid}@{rng.choice(DOMAINS).upper()}"
        created = datetime(2025, 6, 1) + timedelta(
            days=rng.randint(0, 480), seconds=rng.randint(0, 86399)
        )
        rows.append(
            {
                "id": cid,
                "first_name": first,
                "last_name": last,
                "email": email,
                "phone": phone(rng, code),
                "country": country,
                "created_at": created.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
    # Identifier problems audsync must count, not sync: missing emails, and one address shared
    # by two customers (once with other capitals, so it only clashes once normalised).
    for cid in (7, 58, 143):
        rows[cid - 1]["email"] = ""
    rows[120 - 1]["email"] = rows[12 - 1]["email"].strip().upper()
    rows[171 - 1]["email"] = rows[33 - 1]["email"]
    return rows


def orders(rng: random.Random, custs: list[dict]) -> list[dict]:
    # A few loyal customers buy far more often, so "high value" is a real minority.
    weights = [rng.choice([1, 1, 1, 2, 3, 8]) for _ in custs]
    for cid in (7, 12, 120, 33, 171):  # make the bad-email customers show up in audiences
        weights[cid - 1] = 10
    last_day = FIRST_ORDER_DAY + timedelta(days=DAYS - 1)
    rows = []
    for oid in range(1, N_ORDERS + 1):
        cust = rng.choices(custs, weights=weights)[0]
        created = datetime.strptime(cust["created_at"], "%Y-%m-%d %H:%M:%S").date()
        start = max(created, FIRST_ORDER_DAY)
        if start > last_day:
            start = FIRST_ORDER_DAY
            cust = custs[rng.randrange(40)]  # customers created before the window
        day = start + timedelta(days=rng.randint(0, (last_day - start).days))
        amount = round(rng.lognormvariate(3.6, 0.6), 2)
        rows.append(
            {
                "id": oid,
                "customer_id": cust["id"],
                "order_date": day.isoformat(),
                "amount": f"{amount:.2f}",
            }
        )
    rows.sort(key=lambda r: (r["order_date"], r["id"]))
    for oid, row in enumerate(rows, start=1):  # order ids follow order dates, as in a shop
        row["id"] = oid
    return rows


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    rng = random.Random(20261122)
    custs = customers(rng)
    files = {"raw_customers.csv": to_csv(custs), "raw_orders.csv": to_csv(orders(rng, custs))}
    stale = []
    for name, text in files.items():
        path = SEEDS / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path} ({text.count(chr(10)) - 1} rows)")
    if stale:
        print(
            f"stale seeds: {', '.join(stale)}; run python scripts/generate_seeds.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
