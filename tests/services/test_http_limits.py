"""The connection limits' settings (docs/api.md, "Limits of every connection"): what the
environment may set, and the connection cap derived from the limit of open files. The
limits themselves are exercised over real sockets in tests/e2e/test_limits_shutdown.py."""

from __future__ import annotations

import resource

import pytest

from gpupanel.errors import ConfigError
from gpupanel.services.runtime import (
    FD_RESERVE,
    HttpLimits,
    connections_for,
    open_files_limit,
    raise_open_files_limit,
)


def test_defaults_and_what_the_environment_sets() -> None:
    limits = HttpLimits.from_env({})
    assert (limits.idle_timeout_s, limits.header_timeout_s, limits.body_timeout_s) == (5, 5, 30)
    assert limits.max_connections == connections_for(open_files_limit())
    set_ = HttpLimits.from_env({"GPUPANEL_BODY_TIMEOUT_S": "2.5", "GPUPANEL_MAX_CONNECTIONS": "64"})
    assert (set_.body_timeout_s, set_.max_connections) == (2.5, 64)


@pytest.mark.parametrize("bad", ["0", "-1", "ten", "1e3", "\u0664", "1000001"])
def test_a_bad_connection_count_is_refused_naming_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"\$GPUPANEL_MAX_CONNECTIONS must be a whole number"):
        HttpLimits.from_env({"GPUPANEL_MAX_CONNECTIONS": bad})


def test_connections_are_half_the_files_left_after_the_reserve() -> None:
    assert connections_for(1024) == (1024 - FD_RESERVE) // 2 == 384
    assert connections_for(65536) == 32640
    assert connections_for(100) == 16  # never fewer


def test_raising_the_open_files_limit_stays_within_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lower = min(soft, 512)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
        raised = raise_open_files_limit(wanted=lower + 100)
        expected = lower + 100 if hard == resource.RLIM_INFINITY else min(lower + 100, hard)
        assert raised == expected == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raise_open_files_limit(wanted=lower) == raised  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
