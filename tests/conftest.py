"""Known solver defects, listed where everyone sees them (and in the open issue's notes).

Each entry marks a test as an expected failure with the reason; the test still runs, and the
report shows it as XFAIL (or XPASS once the defect is fixed, the cue to delete the entry).
"""
import pytest

KNOWN_DEFECTS: dict = {
    # "test_file.py::test_name[param]": "reason",  (none known at present)
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        key = item.nodeid.split("tests/")[-1]
        if key in KNOWN_DEFECTS:
            item.add_marker(pytest.mark.xfail(reason=KNOWN_DEFECTS[key], strict=False))
