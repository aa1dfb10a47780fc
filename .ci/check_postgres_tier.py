"""Fail CI unless the PostgreSQL tier ran: postgres tests executed, none skipped or failed;
likewise its PgBouncer tier (PostgreSQL behind PgBouncer in transaction pooling mode)."""

import sys
import xml.etree.ElementTree as ElementTree

cases = list(ElementTree.parse(sys.argv[1]).getroot().iter("testcase"))
# tests/conftest.py marks each test that needs PostgreSQL (or PgBouncer) with this property.
incomplete = []
for tier, name in (("postgres", "PostgreSQL"), ("pgbouncer", "PgBouncer")):
    tests = [
        case
        for case in cases
        if any(
            prop.get("name") == "tier" and prop.get("value") == tier
            for prop in case.iter("property")
        )
    ]
    skipped = [case for case in tests if case.find("skipped") is not None]
    failed = [
        case for case in tests if case.find("failure") is not None or case.find("error") is not None
    ]
    ran = len(tests) - len(skipped)
    print(f"{name} tier: {ran} ran, {len(skipped)} skipped, {len(failed)} failed")
    if ran == 0 or skipped or failed:
        incomplete.append(name)
if incomplete:
    sys.exit(f"the {' and the '.join(incomplete)} tier did not run in full")
