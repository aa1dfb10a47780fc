"""Fail CI unless the PostgreSQL tier ran: postgres tests executed, none skipped or failed."""

import sys
import xml.etree.ElementTree as ElementTree

cases = ElementTree.parse(sys.argv[1]).getroot().iter("testcase")
# tests/conftest.py marks each test that needs PostgreSQL with this property.
postgres = [
    case
    for case in cases
    if any(
        prop.get("name") == "tier" and prop.get("value") == "postgres"
        for prop in case.iter("property")
    )
]
skipped = [case for case in postgres if case.find("skipped") is not None]
failed = [
    case for case in postgres if case.find("failure") is not None or case.find("error") is not None
]
ran = len(postgres) - len(skipped)
print(f"PostgreSQL tier: {ran} ran, {len(skipped)} skipped, {len(failed)} failed")
if ran == 0 or skipped or failed:
    sys.exit("the PostgreSQL tier did not run in full")
