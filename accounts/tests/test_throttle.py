"""The sign-in limiter's own rules (the pages and the API test its answers)."""

import pytest

from accounts import throttle
from reclo_site.errors import Code, ServiceError


@pytest.mark.parametrize(
    ("address", "counted_as"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("unknown", "unknown"),
    ],
)
def test_an_ipv6_64_counts_as_one_address(address, counted_as):
    assert throttle.network(address) == counted_as


def test_fresh_ipv6_addresses_of_one_64_share_the_count(settings):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 2
    settings.LOGIN_FAILURES_PER_ADDRESS = 100
    for i in range(3):  # two free, the third wins the back-off slot
        throttle.attempt("alice@example.com", f"2001:db8:0:1::{i + 1}")
    with pytest.raises(ServiceError) as refused:
        throttle.attempt("alice@example.com", "2001:db8:0:1::99")
    assert refused.value.code == Code.LOGIN_THROTTLED and refused.value.headers["Retry-After"] == "1"
    throttle.attempt("alice@example.com", "2001:db8:0:2::1")  # another /64 is another address


def test_a_success_forgets_the_pair_and_is_no_failure_of_the_address(settings):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 5
    for _ in range(3):
        throttle.attempt("alice@example.com", "192.0.2.1")
    throttle.succeeded("alice@example.com", "192.0.2.1")
    assert throttle.count("alice@example.com", "192.0.2.1") == 0
    from django.core.cache import cache

    assert cache.get(throttle.scopes("alice@example.com", "192.0.2.1")[0].key) == 2


def test_the_account_count_reaches_the_alert_threshold_once(settings):
    counts = [throttle.failed("alice@example.com") for _ in range(12)]
    assert counts == list(range(1, 13)) and counts.count(settings.LOGIN_ALERT_AFTER) == 1
