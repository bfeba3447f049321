"""Every page of the portal, with data on it, in a real browser at 1366×768 and on a 390×844 phone.

For each page: a full-page screenshot (into $RECLO_SCREENSHOTS when set,
else the test's tmp dir), no horizontal scrolling, and no serious or
critical axe-core violation (WCAG 2 A/AA, contrast included). The list of
pages is checked against the URL conf: a new page must be added to PAGES
(or to NOT_PAGES, saying why it is not one).
"""

import os
import uuid

import pytest
from django.conf import settings
from django.contrib.auth.tokens import default_token_generator
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import services as account_services
from accounts.audit import audit_record
from accounts.models import AuditEvent, User
from backups.tests.factories import ServerFactory
from reclo_site import testing
from reclo_site.cloud import storage
from recovery import devices, networks
from recovery.failback import FAILBACK_STEPS
from recovery.failover import FAILOVER_STEPS
from recovery.models import Drill, Failback, Recovery, RecoveryNetwork, VpnGateway
from recovery.tests.factories import MiB, backup_chain, recovered_instance
from recovery.tests.test_drill_pages import PNG, finished_drill

from . import axe
from .browser import chromium_page

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

VIEWPORTS = {"desktop": (1366, 768), "phone": (390, 844)}
PASSWORD = "granite-meadow-4821-lantern"

# Named URLs that are not pages a person looks at, and why.
NOT_PAGES = {
    "accounts:logout": "POST only",
    "accounts:time-zone": "POST only (the form is on Security)",
    "accounts:recovery-codes-new": "POST only; its answer is the recovery codes page, visited as 'recovery codes'",
    "backups:backup-undelete": "POST only",
    "recovery:drill-start": "POST only",
    "recovery:status": "JSON for the recovery page's script",
    "recovery:drill-status": "JSON for the drill page's script",
    "recovery:drill-screenshot": "a PNG",
    "recovery:drill-report": "a PDF",
    "recovery:vpn-config": "a WireGuard file",
    "recovery:vpn-qr": "an SVG",
    "recovery:vpn-device-config": "a WireGuard file",
    "recovery:vpn-device-qr": "an SVG",
    "agent-install": "a shell script",
    "agent-package": "a tarball",
    "healthz": "a health check",
    "backups:backup-file-download": "a file, or a folder as a zip",
    "recovery:vpn-dns": "POST only (the form is on the VPN page)",
    # A page, but it needs a real file system inside the restore point, and this tour's are random bytes:
    # tests/test_browser_files.py browses one at 1280 and 390 px and checks it does not scroll sideways.
    "backups:backup-files": "toured by tests/test_browser_files.py over real ext4 and NTFS disks",
}
NOT_PAGE_NAMESPACES = {
    "api": "the JSON API (docs/api.md) and its Redoc page (Redoc's own styles)",
    "admin": "Django's admin; its sign-in is the portal's (visited as 'admin sign-in')",
}


def page_names() -> set[str]:
    """Every named URL of the URL conf, as 'namespace:name'."""
    names = set()

    def walk(patterns, namespace):
        for p in patterns:
            if isinstance(p, URLResolver):
                ns = ":".join(x for x in (namespace, p.namespace) if x) if p.namespace else namespace
                if ns.split(":")[0] in NOT_PAGE_NAMESPACES:
                    continue
                walk(p.url_patterns, ns)
            elif isinstance(p, URLPattern) and p.name:
                names.add(f"{namespace}:{p.name}" if namespace else p.name)

    walk(get_resolver().url_patterns, "")
    return names


def make_data(user, twofactor_user):
    """An account with something on every page: servers, restore points, failovers, a drill, VPN devices, tokens."""
    server = ServerFactory(user=user, name="frontdesk", hostname="frontdesk.clinic.lan")
    backups, _ = backup_chain(user=user, server=server, size=8 * MiB, incrementals=2)
    empty = ServerFactory(user=user, name="old-reception-pc")
    drill = finished_drill(backups[-1], passed=True, screenshot=True)
    finished_drill(backups[0], passed=False)
    # A drill still booting: the page that polls and speaks through its live region.
    running_drill = Drill.objects.create(
        user=user, server=server, server_name=server.name, backup=backups[-1], backup_ref=backups[-1].pk,
        backup_created=backups[-1].date_created, status="booting", trigger=Drill.Trigger.PORTAL,
    )  # fmt: skip
    for n, (step, status) in enumerate((("preparing", "done"), ("booting", "running"), ("checking", "pending"))):
        running_drill.steps.create(name=step, position=n, status=status, started=timezone.now() if n < 2 else None,
                                   detail="Read 1 restore point(s); 8 MiB of data." if n == 0 else "")  # fmt: skip
    storage.put_object(f"drills/{user.pk}/{drill.pk}/screenshot.png", PNG)

    ready = recovered_instance(user=user, server=server)
    stopped = recovered_instance(user=user, server=ServerFactory(user=user, name="lab-server"), state="stopped")
    failed = Recovery.objects.create(
        user=user, server=empty, server_name=empty.name, backup_ref=uuid.uuid4(), disk="sda",
        virtual_size=8 * MiB, instance_type="t3.medium", import_method="ebs_direct",
        status=Recovery.Status.FAILED, error="The cloud refused the disk image: it is not a bootable disk.",
        error_code=603, finished=timezone.now(),
    )  # fmt: skip
    running_server = ServerFactory(user=user, name="billing")
    running = Recovery.objects.create(
        user=user, server=running_server, server_name=running_server.name, backup_ref=uuid.uuid4(), disk="sda",
        virtual_size=8 * MiB, instance_type="t3.medium", import_method="ebs_direct", status=FAILOVER_STEPS.names[1],
    )  # fmt: skip
    for n, step in enumerate(FAILOVER_STEPS):
        status = "done" if n < 1 else "running" if n == 1 else "pending"
        running.steps.create(name=step.name, position=n, status=status, started=timezone.now() if n <= 1 else None)

    failback = Failback.objects.create(
        user=user, recovery=ready.recovery, server=server, server_name=server.name, instance_id=ready.instance_id,
        kind="incremental", parent=backups[-1], status=Failback.Status.READY, snapshot_at=timezone.now(),
        finished=timezone.now(),
    )  # fmt: skip
    for n, step in enumerate(FAILBACK_STEPS):
        failback.steps.create(name=step.name, position=n, status="done", detail="Done.")

    net = RecoveryNetwork.objects.create(user=user, ready=True)
    gateway = networks._gateway_row(net)
    VpnGateway.objects.filter(pk=gateway.pk).update(state=VpnGateway.State.READY, public_ip="203.0.113.9")
    device = devices.device_create(user=user, name="Reception PC")

    token, _ = account_services.token_create(user=user, name="backup-script")
    audit_record(AuditEvent.Kind.BACKUP_VERIFIED, user=user, server="frontdesk", disk="sda",
                 backup_kind="incremental", file_size=675_840, backup_id=str(backups[-1].pk))  # fmt: skip
    audit_record(AuditEvent.Kind.LOGIN_FAILED, user=user, address="198.51.100.7")
    audit_record(AuditEvent.Kind.FAILOVER_READY, user=user, server="frontdesk", recovery_id=str(ready.recovery_id))
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    reset_token = default_token_generator.make_token(user)
    return {
        "server": server.pk,
        "empty": empty.pk,
        "backup": backups[-1].pk,
        "drill": drill.pk,
        "running drill": running_drill.pk,
        "ready": ready.recovery_id,
        "failed": failed.pk,
        "running": running.pk,
        "stopped": stopped.instance_id,
        "failback": failback.pk,
        "instance": ready.instance_id,
        "device": device.pk,
        "token": token.pk,
        "uid": uid,
        "reset_token": reset_token,
    }


def pages(d) -> dict[str, tuple[str, str]]:
    """label → (who, path). who: 'anon', 'owner', or 'twofactor' (a user with two-factor on, signed in)."""
    r = reverse
    return {
        "sign up": ("anon", r("accounts:signup")),
        "sign in": ("anon", r("accounts:login")),
        "admin sign-in": ("anon", "/admin/login/"),
        "password reset": ("anon", r("accounts:password-reset")),
        "password reset sent": ("anon", r("accounts:password-reset-sent")),
        "password reset confirm": ("anon", r("accounts:password-reset-confirm", args=[d["uid"], d["reset_token"]])),
        "password reset complete": ("anon", r("accounts:password-reset-complete")),
        "not found": ("anon", "/no-such-page/"),
        "two-factor code": ("verify", r("accounts:verify")),
        "servers": ("owner", r("backups:dashboard")),
        "add a server": ("owner", r("backups:add-server")),
        "server": ("owner", r("backups:server-detail", args=[d["server"]])),
        "server without restore points": ("owner", r("backups:server-detail", args=[d["empty"]])),
        "revoke a server": ("owner", r("backups:server-revoke", args=[d["server"]])),
        "remove a server": ("owner", r("backups:server-remove", args=[d["empty"]])),
        "delete a restore point": ("owner", r("backups:backup-delete", args=[d["backup"]])),
        "fail over": ("owner", r("recovery:failover-start", args=[d["server"]])),
        "warm standby": ("owner", r("recovery:standby", args=[d["server"]])),
        "recovery ready": ("owner", r("recovery:detail", args=[d["ready"]])),
        "recovery running": ("owner", r("recovery:detail", args=[d["running"]])),
        "recovery failed": ("owner", r("recovery:detail", args=[d["failed"]])),
        "recovery": ("owner", r("recovery:instances")),
        "stop a server in the cloud": ("owner", r("recovery:instance-action", args=[d["instance"], "stop"])),
        "terminate a server in the cloud": ("owner", r("recovery:instance-action", args=[d["stopped"], "terminate"])),
        "bring a server home": ("owner", r("recovery:failback-start", args=[d["ready"]])),
        "brought home": ("owner", r("recovery:failback", args=[d["failback"]])),
        "drill": ("owner", r("recovery:drill", args=[d["drill"]])),
        "drill running": ("owner", r("recovery:drill", args=[d["running drill"]])),
        "contingency report": ("owner", r("recovery:contingency-report")),
        "vpn devices": ("owner", r("recovery:vpn-devices")),
        "revoke a vpn device": ("owner", r("recovery:vpn-device-revoke", args=[d["device"]])),
        "api tokens": ("owner", r("accounts:tokens")),
        "revoke a token": ("owner", r("accounts:token-revoke", args=[d["token"]])),
        "activity": ("owner", r("accounts:activity")),
        "security": ("owner", r("accounts:security")),
        "change password": ("owner", r("accounts:password-change")),
        "turn on two-factor": ("owner", r("accounts:twofactor-setup")),
        "turn off two-factor": ("twofactor", r("accounts:twofactor-disable")),
        "recovery codes": ("twofactor", "POST " + r("accounts:recovery-codes-new")),
    }


# Which named URL each visited page stands for (the test below checks every name is here or in NOT_PAGES).
COVERS = {
    "accounts:signup", "accounts:login", "accounts:verify", "accounts:password-change", "accounts:password-reset",
    "accounts:password-reset-sent", "accounts:password-reset-confirm", "accounts:password-reset-complete",
    "accounts:security", "accounts:twofactor-setup", "accounts:twofactor-disable", "accounts:tokens",
    "accounts:token-revoke", "accounts:activity", "backups:dashboard", "backups:add-server",
    "backups:server-detail", "backups:server-revoke", "backups:server-remove", "backups:backup-delete",
    "recovery:instances", "recovery:vpn-devices", "recovery:vpn-device-revoke", "recovery:failover-start",
    "recovery:contingency-report", "recovery:drill", "recovery:detail", "recovery:instance-action",
    "recovery:failback-start", "recovery:failback",
    "recovery:standby",
}  # fmt: skip


def test_the_page_list_covers_the_url_conf():
    missing = page_names() - COVERS - set(NOT_PAGES)
    assert not missing, (
        f"pages not in the browser tour: {sorted(missing)}; add each to pages() and COVERS "
        "(or to NOT_PAGES with the reason it is no page)"
    )
    assert not COVERS - page_names(), "COVERS names a URL that no longer exists"


def _session_cookie(user, live_server, verified_device=None) -> dict:
    client = Client()
    client.force_login(user)
    if verified_device is not None:
        from django_otp import DEVICE_ID_SESSION_KEY

        session = client.session
        session[DEVICE_ID_SESSION_KEY] = verified_device.persistent_id
        session.save()
    return {"name": settings.SESSION_COOKIE_NAME, "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
            "url": live_server.url}  # fmt: skip


def _check(page, label, viewport, shots, axe_source, problems):
    page.wait_for_load_state("load")
    name = f"{viewport}-{label.replace(' ', '-')}"
    page.screenshot(path=os.path.join(shots, f"{name}.png"), full_page=True)
    width = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    if width[0] > width[1]:
        wide = page.evaluate(
            """() => [...document.querySelectorAll('body *')]
                .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
                .slice(0, 5)
                .map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))"""
        )
        problems.append(f"{name}: {width[0]} px wide in a {width[1]} px window ({wide})")
    for v in axe.violations(page, axe_source):
        problems.append(f"{name}: axe {v['impact']} {v['id']} ({v['help']}): {v['nodes']}")


def test_every_page_fits_a_phone_and_passes_axe(live_server, aws, user, tmp_path):
    if not (axe.cache_dir() / "axe.min.js").exists():
        testing.require_tool("npm")  # fails under CI, skips elsewhere
    axe_source = axe.fetch().read_text()
    twofactor_user = User.objects.create_user(username="second.owner", email="second@example.com", password=PASSWORD)
    device = TOTPDevice.objects.create(user=twofactor_user, name="phone", confirmed=True)
    data = make_data(user, twofactor_user)
    visits = pages(data)
    shots = os.environ.get("RECLO_SCREENSHOTS") or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    problems: list[str] = []
    for viewport, size in VIEWPORTS.items():
        for who in ("anon", "verify", "owner", "twofactor"):
            with chromium_page(viewport=size) as page:
                if who == "owner":
                    page.context.add_cookies([_session_cookie(user, live_server)])
                elif who == "twofactor":
                    page.context.add_cookies([_session_cookie(twofactor_user, live_server, verified_device=device)])
                elif who == "verify":
                    # Signing in with a password first: the code page only shows mid sign-in.
                    page.goto(live_server.url + reverse("accounts:login"))
                    page.fill("#id_email", twofactor_user.email)
                    page.fill("#id_password", PASSWORD)
                    page.click("button[type=submit]")
                    page.wait_for_url("**/accounts/verify/**")
                for label, (whose, path) in visits.items():
                    if whose != who:
                        continue
                    if path.startswith("POST "):
                        # Pages that answer a form: reach them by pressing its button.
                        page.goto(live_server.url + reverse("accounts:security"))
                        page.click("text=Make new recovery codes")
                    elif who != "verify":
                        response = page.goto(live_server.url + path)
                        expected = 404 if label == "not found" else 200
                        assert response.status == expected, f"{label} ({path}): {response.status}"
                    _check(page, label, viewport, shots, axe_source, problems)
                if who == "owner" and viewport == "phone":
                    _check_the_menu_folds(page, live_server)
    assert not problems, "\n".join(problems)


def _check_the_menu_folds(page, live_server):
    """On a phone the navigation is one "Menu" button until pressed."""
    page.goto(live_server.url + reverse("backups:dashboard"))
    nav = page.locator("#main-nav")
    assert not nav.is_visible()
    button = page.locator(".nav-toggle")
    assert button.is_visible() and button.get_attribute("aria-expanded") == "false"
    button.click()
    assert nav.is_visible() and button.get_attribute("aria-expanded") == "true"
    page.locator("#main-nav >> text=Activity").click()
    page.wait_for_url("**/accounts/activity/")
    assert "Backup of frontdesk finished: 660.0\xa0KB of changes" in page.locator("[data-testid=activity]").inner_text()


def test_the_skip_link_is_first_and_moves_to_the_content(live_server, user):
    with chromium_page(viewport=VIEWPORTS["phone"]) as page:
        page.context.add_cookies([_session_cookie(user, live_server)])
        page.goto(live_server.url + reverse("backups:dashboard"))
        page.keyboard.press("Tab")
        focused = page.evaluate("() => document.activeElement.textContent.trim()")
        assert focused == "Skip to the page's content"
        assert page.locator(".skip-link").is_visible()
        page.keyboard.press("Enter")
        assert page.evaluate("() => document.activeElement.id") == "main"


def test_sign_up_takes_the_browsers_time_zone(live_server, aws):
    with chromium_page(timezone_id="America/Chicago") as page:
        page.goto(f"{live_server.url}/accounts/signup/")
        page.fill("#id_username", "dr.jones")
        page.fill("#id_email", "jones@clinic.example")
        page.fill("#id_password", PASSWORD)
        page.fill("#id_password_again", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("text=Welcome to ReClo, dr.jones")
        assert "Times are shown in America/Chicago" in page.locator("footer").inner_text()
    assert User.objects.get(username="dr.jones").time_zone == "America/Chicago"
