"""Django's admin behind the portal's sign-in: the same limits, and the second factor."""

import pytest
import time_machine
from django.test import Client

from accounts.models import User
from reclo_site import testing

from .test_twofactor import enable

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser(db):
    return User.objects.create_superuser("root.admin", "root@example.com", testing.PASSWORD)


def test_the_admin_login_is_the_portals_sign_in(client):
    page = client.get("/admin/login/?next=/admin/")
    html = page.content.decode()
    assert page.status_code == 200 and 'name="email"' in html and "Forgot your password?" in html


def test_the_admin_login_is_throttled(settings, superuser):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 5
    attacker = Client(REMOTE_ADDR="203.0.113.5")
    wrong = {"email": superuser.email, "password": "not-the-password"}
    with time_machine.travel("2026-11-26 10:00:00Z", tick=False):
        answers = [attacker.post("/admin/login/", wrong).status_code for _ in range(25)]
        assert answers[:6] == [200] * 6 and set(answers[6:]) == {429}
        right = attacker.post("/admin/login/", {"email": superuser.email, "password": testing.PASSWORD})
        assert right.status_code == 429
        assert attacker.get("/admin/").status_code == 302
        # The superuser herself, from her own address, still gets in (to the second factor).
        enable(superuser)
        mine = Client(REMOTE_ADDR="198.51.100.9")
        assert mine.post("/admin/login/", {"email": superuser.email, "password": testing.PASSWORD}).status_code == 302


def test_the_admin_needs_the_second_factor(superuser):
    app, _ = enable(superuser)
    browser = Client()
    first = browser.post("/admin/login/?next=/admin/", {"email": superuser.email, "password": testing.PASSWORD})
    assert first["Location"] == "/accounts/verify/"
    assert browser.get("/admin/").status_code == 302
    assert browser.post("/accounts/verify/", {"code": app.now()})["Location"] == "/admin/"
    assert browser.get("/admin/").status_code == 200


def test_staff_without_two_factor_are_sent_to_turn_it_on(superuser):
    browser = Client()
    browser.post("/admin/login/?next=/admin/", {"email": superuser.email, "password": testing.PASSWORD})
    assert browser.get("/admin/")["Location"].startswith("/admin/login/")
    sent = browser.get("/admin/login/?next=/admin/", follow=True)
    assert sent.redirect_chain[-1][0] == "/accounts/security/"
    assert b"The admin site needs two-factor authentication" in sent.content


def test_a_customer_cannot_use_the_admin(owner):
    answer = owner.get("/admin/", follow=True)
    assert answer.redirect_chain[-1][0] == "/"
    assert b"This account cannot use the admin site." in answer.content


def test_the_admins_password_change_is_the_portals(superuser):
    app, _ = enable(superuser)
    browser = Client()
    browser.post("/admin/login/", {"email": superuser.email, "password": testing.PASSWORD})
    browser.post("/accounts/verify/", {"code": app.now()})
    assert browser.get("/admin/password_change/")["Location"] == "/accounts/password/"
