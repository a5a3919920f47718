"""The simulated backend passes the shared interface suite."""
import pytest

from interface_suite import SEMInterfaceTests, StageInterfaceTests


@pytest.fixture
def sem(scope):
    return scope.sem


@pytest.fixture
def stage(scope):
    return scope.stage


class TestSimSEM(SEMInterfaceTests):
    pass


class TestSimStage(StageInterfaceTests):
    pass
