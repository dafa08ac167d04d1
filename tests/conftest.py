"""Fixtures shared by the tests."""

import pytest

# Every backend that can run on this machine's CPU. The C++ one must be built: a missing build
# fails the tests instead of silently testing the reference twice.
CPU_BACKENDS = ["reference", "cpu"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param
