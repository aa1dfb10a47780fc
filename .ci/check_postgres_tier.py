"""Fail CI unless the PostgreSQL tiers ran: postgres tests executed, none skipped or failed;
likewise the TLS tier (a cluster taking TLS connections only) and the PgBouncer tier
(PostgreSQL behind PgBouncer in transaction pooling mode)."""

import sys
import xml.etree.ElementTree as ElementTree

cases = list(ElementTree.parse(sys.argv[1]).getroot().iter("testcase"))
incomplete = []
# tests/conftest.py marks each test of a tier with this property.
for tier, label in (
    ("postgres", "PostgreSQL"),
    ("postgres-tls", "PostgreSQL TLS"),
    ("pgbouncer", "PgBouncer"),
):
    tested = [
        case
        for case in cases
        if any(
            prop.get("name") == "tier" and prop.get("value") == tier
            for prop in case.iter("property")
        )
    ]
    skipped = [case for case in tested if case.find("skipped") is not None]
    failed = [
        case
        for case in tested
        if case.find("failure") is not None or case.find("error") is not None
    ]
    ran = len(tested) - len(skipped)
    print(f"{label} tier: {ran} ran, {len(skipped)} skipped, {len(failed)} failed")
    if ran == 0 or skipped or failed:
        incomplete.append(label)
if incomplete:
    sys.exit(f"did not run in full: {', '.join(incomplete)} tier")
