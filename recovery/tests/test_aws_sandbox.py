"""The aws drill sandbox: the failover's image in an isolated subnet, status checks, console, screenshot, teardown.

Against moto where it implements the calls: EBS direct, RegisterImage,
VPCs, subnets, security groups, RunInstances, DescribeInstanceStatus (moto
answers "ok" at once), TerminateInstances, the deletions. Where it does not,
each test says what stands in:

- GetConsoleScreenshot is not in moto (NotImplementedError): `EC2Extension`
  answers it as AWS documents it (`ImageData`, a base64 JPEG), through a
  botocore `before-call` handler on the one operation, so every other call
  still reaches moto.
- GetConsoleOutput is in moto, but always a 2006 Xen boot log without a
  login prompt: `EC2Extension` answers it with a console that reaches one
  (or panics), base64 as AWS sends it. The SIGKILL test leaves moto's own
  answer, which never shows a ready line: the drill waits until it is killed.
- A status check that is still "initializing" when the console is ready
  (moto reports "ok" at once): botocore's Stubber scripts the calls.
"""

import base64
import io
import os
import signal
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from django.db import connection
from django.utils import timezone
from PIL import Image

from backups.models import AccountLimits
from reclo_site import testing
from reclo_site.celery import app as celery_app
from reclo_site.cloud import clients, compute, imaging, network
from recovery import drill_report, drill_services, engine, services, tasks
from recovery.drills import DRILL
from recovery.models import Drill, DrillStep
from recovery.sandbox import BootRequest
from recovery.sandbox.aws import STATUS_CHECK, AwsSandbox

from .cloud_inventory import NOTHING, drill_inventory
from .factories import MiB, ServerFactory, backup_chain
from .test_drills import drive_drill

pytestmark = pytest.mark.django_db

READY_CONSOLE = (
    "[    0.000000] Linux version 6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org)\n"
    "[    2.104113] EXT4-fs (nvme0n1p1): mounted filesystem with ordered data mode.\n"
    "Debian GNU/Linux 12 front-desk ttyS0\n\nfront-desk login: "
)
PANIC_CONSOLE = (
    '[    1.991822] VFS: Cannot open root device "nvme0n1p1" or unknown-block(0,0): error -6\n'
    "[    1.992004] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n"
)


def jpeg(size=(64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (20, 40, 200)).save(out, format="JPEG")
    return out.getvalue()


class EC2Extension:
    """Answers GetConsoleOutput and GetConsoleScreenshot as AWS documents them; records what the drill asked.

    Everything else goes to moto. While the guest "boots" (the first console
    read) it also notes how isolated its network is, from moto's own state.
    """

    def __init__(self, console: str = READY_CONSOLE, screenshot: bytes | None = None):
        self.console = console
        self.screenshot = jpeg() if screenshot is None else screenshot
        self.calls: dict[str, list[dict]] = {}
        self.isolation: dict | None = None
        self.fail: dict[str, str] = {}
        self.ec2 = clients.client("ec2")
        self.ec2.meta.events.register("before-parameter-build.ec2.*", self._record)
        self.ec2.meta.events.register("before-call.ec2.*", self._answer)
        self.ebs = clients.client("ebs")
        self.ebs.meta.events.register("before-parameter-build.ebs.StartSnapshot", self._record)

    def _record(self, params, model, **kwargs):
        self.calls.setdefault(model.name, []).append(dict(params))

    def _answer(self, model, params, **kwargs):
        if model.name in self.fail:
            code = self.fail[model.name]
            raise ClientError({"Error": {"Code": code, "Message": f"{code} (scripted)"}}, model.name)
        instance_id = params.get("body", {}).get("InstanceId", "")
        if model.name == "GetConsoleOutput":
            if self.isolation is None:
                self.isolation = self._isolation(instance_id)
            output = base64.b64encode(self.console.encode()).decode()
            return AWSResponse(None, 200, {}, None), {"InstanceId": instance_id, "Output": output}
        if model.name == "GetConsoleScreenshot":
            data = base64.b64encode(self.screenshot).decode()
            return AWSResponse(None, 200, {}, None), {"InstanceId": instance_id, "ImageData": data}
        return None

    def _isolation(self, instance_id: str) -> dict:
        ec2 = clients.new_client("ec2")
        instance = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        vpc_id = instance["VpcId"]
        routes = [
            r
            for table in ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["RouteTables"]
            for r in table["Routes"]
        ]
        gateways = ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}])
        (group,) = instance["SecurityGroups"]
        return {
            "routes": sorted(r.get("GatewayId", "") for r in routes),
            "internet_gateways": len(gateways["InternetGateways"]),
            "ingress": network.ingress_rules(group["GroupId"]),
            "egress": network.egress_rules(group["GroupId"]),
            "public_ip": instance.get("PublicIpAddress"),
            "tags": {t["Key"]: t["Value"] for t in instance.get("Tags", [])},
        }


@pytest.fixture
def aws_drills(aws, user, settings, drill_dir):
    """An account whose drills boot in the aws sandbox (its AccountLimits), with moto quick to answer."""
    AccountLimits.objects.create(user=user, drill_sandbox="aws")
    settings.RECLO_DRILL_AWS_POLL = 0.05
    settings.RECLO_DRILL_TIME_LIMIT = 60
    return user


@pytest.fixture
def drill_dir(settings, tmp_path):
    settings.RECLO_DRILL_DIR = tmp_path
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    return tmp_path


def drilled(user, **server_fields) -> Drill:
    server = ServerFactory(user=user, name="front-desk", **server_fields)
    backups, _ = backup_chain(user=user, server=server, size=4 * MiB, incrementals=1)
    drill = drill_services.drill_start(user=user, backup_id=backups[-1].pk)
    assert drill.sandbox == "aws"
    return drive_drill(drill.pk)


# moto for everything but GetConsoleOutput's text and GetConsoleScreenshot (EC2Extension).
def test_a_drill_boots_the_image_in_an_isolated_subnet_passes_and_leaves_nothing(aws_drills, settings):
    ext = EC2Extension()
    puts: list[int] = []  # the PutSnapshotBlock calls moto answered (its cost is per block written)
    ext.ebs.meta.events.register(
        "before-parameter-build.ebs.PutSnapshotBlock", lambda params, **kwargs: puts.append(params["BlockIndex"])
    )
    drill = drilled(aws_drills, preflight={"boot_mode": "uefi", "os": "linux"})
    assert drill.status == "passed", drill.error
    assert [c["name"] for c in drill.checks] == [
        "reached a login prompt or the system's ready line",
        STATUS_CHECK,
        "answered within the time limit",
    ]
    assert "front-desk login:" in drill.console_excerpt and drill.rto_seconds > 0
    # The failover's way to an image: an EBS direct snapshot (ClientToken) and RegisterImage, in UEFI mode.
    (start,) = ext.calls["StartSnapshot"]
    assert start["ClientToken"] == f"reclo-drill-{drill.pk}"
    (register,) = ext.calls["RegisterImage"]
    assert register["BootMode"] == "uefi" and register["Name"] == f"reclo-drill-{drill.pk}"
    (launch,) = ext.calls["RunInstances"]
    assert launch["ClientToken"].startswith(f"reclo-drill-{drill.pk}-") and "NetworkInterfaces" not in launch
    # While it booted: no route but the VPC's own, no gateway, a group that admits and lets out nothing.
    assert ext.isolation["routes"] == ["local"] and ext.isolation["internet_gateways"] == 0
    assert ext.isolation["ingress"] == [] and ext.isolation["egress"] == []
    assert ext.isolation["public_ip"] is None
    tags = ext.isolation["tags"]
    assert (tags["reclo:drill"], tags["reclo:tenant"], tags["reclo:role"]) == (
        f"drill-{drill.pk}",
        str(aws_drills.pk),
        "drill-server",
    )
    assert ext.calls["GetConsoleOutput"][0]["Latest"] is True
    # The screenshot: AWS's JPEG, kept as a PNG of the same size, stored and locked with the evidence.
    stored = drill.evidence["screenshot.png"]
    with Image.open(io.BytesIO(_read(stored))) as shot:
        assert (shot.format, shot.size) == ("PNG", (64, 48))
    # Everything the drill made is gone, and its record says so.
    assert drill_inventory() == NOTHING
    facts = drill_report.drill_facts(drill)
    assert facts["sandbox"] == "aws" and "reclo:drill=drill-" in facts["cost"]["note"]
    # Its cost, estimated from what it did: the instance's minutes and disk, the snapshot, every block written.
    prepared = drill.steps.get(name="preparing").outputs
    assert prepared["blocks_written"] == len(puts) > 0 and prepared["volume_gib"] == 1
    cost = facts["cost"]
    assert cost["estimated"] is True and cost["note"].startswith("Estimated cost: ")
    assert [p["what"].split(" ")[0] for p in cost["parts"]] == ["instance", "its", "snapshot", f"{len(puts):,}"]
    assert cost["parts"][0]["what"] == f"instance {settings.RECLO_DRILL_INSTANCE_TYPE} 1 min"
    assert cost["parts"][-1] == {
        "what": f"{len(puts)} PutSnapshotBlock calls",
        "usd": str(Decimal("0.000006") * len(puts)),
    }
    made = [r["what"] for r in drill.resources]
    for kind in ("image ami-", "snapshot snap-", "VPC vpc-", "subnet subnet-", "security group sg-", "instance i-"):
        assert sum(w.startswith(kind) for w in made) == 1, (kind, made)
    assert not any(w.startswith("EBS snapshot and image") for w in made)  # the placeholder took the ids' place
    assert all(r["removed"] for r in drill.resources)


def _read(stored: dict) -> bytes:
    from reclo_site.cloud import storage

    with storage.ObjectReader(stored["key"], version_id=stored["version_id"]) as reader:
        return reader.read()


# moto, with EC2Extension's console showing a kernel panic.
def test_a_panicking_image_fails_with_the_console_as_reason_and_leaves_nothing(aws_drills):
    EC2Extension(console=PANIC_CONSOLE)
    drill = drilled(aws_drills)
    assert drill.status == "failed"
    assert "Kernel panic" in drill.error and "Unable to mount root fs" in drill.console_excerpt
    assert drill_inventory() == NOTHING and all(r["removed"] for r in drill.resources)


# moto, with EC2Extension refusing RunInstances as AWS does for an account not allowed that type.
def test_a_launch_that_fails_still_deletes_the_image_snapshot_and_network(aws_drills):
    ext = EC2Extension()
    ext.fail["RunInstances"] = "Unsupported"
    drill = drilled(aws_drills)
    assert drill.status == "failed" and drill.error_code == 411
    assert "could not be started" in drill.error and "Unsupported" in drill.error
    # The preparing step had made the snapshot and image, the boot the VPC, subnet and group.
    assert ext.calls["RegisterImage"] and ext.calls["CreateVpc"] and ext.calls["CreateSecurityGroup"]
    assert drill_inventory() == NOTHING and all(r["removed"] for r in drill.resources)


# moto; the image defaults to legacy BIOS without a preflight, as the failover's does.
def test_without_a_preflight_the_image_boots_in_legacy_bios_mode(aws_drills):
    ext = EC2Extension()
    drill = drilled(aws_drills)
    assert drill.status == "passed", drill.error
    assert ext.calls["RegisterImage"][0]["BootMode"] == "legacy-bios"


# moto and EC2Extension: the port the server asks to probe cannot be reached in the isolated subnet; the report says so.
def test_a_probe_port_is_reported_as_not_checked_in_the_aws_sandbox(aws_drills):
    EC2Extension()
    drill = drilled(aws_drills, drill_probe_port=3389)
    assert drill.status == "passed" and drill.probe_port == 3389
    assert "port" not in " ".join(c["name"] for c in drill.checks)
    facts = drill_report.drill_facts(drill)
    assert facts["not_checked"].startswith("port 3389: nothing may reach the isolated subnet")


# moto: a teardown that AWS could not finish (the instance would not terminate in time) is finished by the sweep.
def test_an_interrupted_teardown_is_finished_by_the_reconcilers_sweep(aws_drills, monkeypatch):
    ext = EC2Extension()
    ext.fail["TerminateInstances"] = "InternalError"
    drill = drilled(aws_drills)
    assert drill.status == "passed"  # the verdict stands; the cleanup is owed
    assert drill_inventory()["instances"] == 1
    assert any(not r["removed"] for r in drill.resources)
    del ext.fail["TerminateInstances"]
    tasks.drills_reconcile()
    drill.refresh_from_db()
    assert drill_inventory() == NOTHING and all(r["removed"] for r in drill.resources)


# moto: a failover of the server cancels the drill; its teardown (in the request, not waiting on AWS) deletes the image.
def test_a_failover_cancels_an_aws_drill_and_its_image_and_snapshot_go(aws_drills, django_capture_on_commit_callbacks):
    EC2Extension()
    server = ServerFactory(user=aws_drills, name="front-desk")
    backups, _ = backup_chain(user=aws_drills, server=server, size=4 * MiB, incrementals=0)
    drill = drill_services.drill_start(user=aws_drills, backup_id=backups[-1].pk)
    assert engine.run_step(drill.pk, "preparing", pipeline=DRILL) == "done"
    assert (drill_inventory()["images"], drill_inventory()["snapshots"]) == (1, 1)
    with django_capture_on_commit_callbacks(execute=True):
        services.recovery_start(user=aws_drills, backup_id=backups[-1].pk)
    drill.refresh_from_db()
    assert drill.status == "failed" and drill.error.startswith("Cancelled: a failover")
    assert drill_inventory() == NOTHING and all(r["removed"] for r in drill.resources)


# moto: a preparing step run again (its worker died after RegisterImage) finds the image by its name.
def test_preparing_again_finds_the_image_and_makes_nothing_twice(aws, tmp_path):
    ext = EC2Extension()
    sandbox = AwsSandbox(poll=0.01)
    request = BootRequest(evidence_dir=tmp_path, boot_mode="uefi", label="drill-again")
    block = bytes(range(256)) * 2048  # one 512 KiB EBS block

    def prepare():
        return sandbox.prepare([(3, block)], virtual_size=8 * MiB, request=request, description="test")

    first = prepare()
    assert prepare() == first
    assert len(ext.calls["StartSnapshot"]) == 1 and len(ext.calls["RegisterImage"]) == 1
    assert (drill_inventory()["images"], drill_inventory()["snapshots"]) == (1, 1)
    (snapshot,) = imaging.find_snapshots({"reclo:drill": "drill-again"})
    assert sandbox.destroy("drill-again") == [f"image {first}", f"snapshot {snapshot['snapshot_id']}"]
    assert drill_inventory() == NOTHING


# moto: resources of a run whose worker and drill teardown both vanished go once their deadline tag passes.
def test_reap_deletes_what_a_dead_run_left_after_its_deadline(aws):
    sandbox = AwsSandbox(poll=0.01)
    past = timezone.now().timestamp() - 60
    tags = sandbox._tags("drill-orphan", "drill-vpc", past)
    vpc_id = network.create_vpc(cidr="10.250.0.0/24", tags=tags)
    network.create_subnet(vpc_id=vpc_id, cidr="10.250.0.0/24", tags=tags)
    live = sandbox._tags("drill-live", "drill-vpc", past + 3600)
    network.create_vpc(cidr="10.250.0.0/24", tags=live)
    removed = sandbox.reap()
    assert sorted(w.split()[0] for w in removed) == ["subnet", "vpc"]
    assert network.find_tagged("vpc", {"reclo:drill": "drill-live"})  # not yet due
    assert drill_inventory()["subnets"] == 0 and drill_inventory()["vpcs"] == 1


# botocore's Stubber: moto answers "ok" at once, AWS reports "initializing" for a minute or two first.
def test_the_verdict_waits_for_the_status_checks_and_keeps_the_screenshot(aws, tmp_path, monkeypatch):
    ec2 = clients.new_client("ec2")
    monkeypatch.setattr(compute, "_ec2", lambda: ec2)
    instance = {"InstanceId": "i-0123456789abcdef0", "State": {"Name": "running"}, "InstanceType": "t3.small"}
    ready = base64.b64encode(READY_CONSOLE.encode()).decode()

    def status(system, inst):
        return {
            "InstanceStatuses": [
                {"InstanceId": instance["InstanceId"], "SystemStatus": {"Status": system},
                 "InstanceStatus": {"Status": inst}}
            ]
        }  # fmt: skip

    with Stubber(ec2) as stub:
        stub.add_response("describe_instances", {"Reservations": [{"Instances": [instance]}]})
        stub.add_response("get_console_output", {"InstanceId": instance["InstanceId"], "Output": ready})
        stub.add_response("describe_instance_status", status("initializing", "initializing"))
        stub.add_response("describe_instance_status", status("ok", "initializing"))
        stub.add_response("describe_instance_status", status("ok", "ok"))
        stub.add_response(
            "get_console_screenshot",
            {"InstanceId": instance["InstanceId"], "ImageData": base64.b64encode(jpeg((80, 60))).decode()},
            {"InstanceId": instance["InstanceId"], "WakeUp": True},
        )
        request = BootRequest(evidence_dir=tmp_path, time_limit=60, label="drill-stubbed", probe_port=3389)
        verdict = AwsSandbox(poll=0.01)._judge(instance["InstanceId"], request, tmp_path, *[time.monotonic()] * 2)
        stub.assert_no_pending_responses()
    assert verdict.passed, verdict.reason
    assert verdict.checks[1].detail == "system: ok, instance: ok"
    assert "port 3389" in verdict.details["not_checked"]  # nothing may reach the subnet to probe it
    with Image.open(verdict.screenshot_path) as shot:
        assert (shot.format, shot.size) == ("PNG", (80, 60))


# botocore's Stubber: an impaired instance (AWS's failed status check) fails the drill with AWS's words.
def test_an_impaired_instance_fails_its_status_check(aws, tmp_path, monkeypatch):
    ec2 = clients.new_client("ec2")
    monkeypatch.setattr(compute, "_ec2", lambda: ec2)
    instance = {"InstanceId": "i-0fedcba9876543210", "State": {"Name": "running"}, "InstanceType": "t3.small"}
    with Stubber(ec2) as stub:
        stub.add_response("describe_instances", {"Reservations": [{"Instances": [instance]}]})
        stub.add_response(
            "get_console_output",
            {"InstanceId": instance["InstanceId"], "Output": base64.b64encode(READY_CONSOLE.encode()).decode()},
        )
        stub.add_response(
            "describe_instance_status",
            {"InstanceStatuses": [{"InstanceId": instance["InstanceId"], "SystemStatus": {"Status": "ok"},
                                   "InstanceStatus": {"Status": "impaired"}}]},
        )  # fmt: skip
        stub.add_client_error("get_console_screenshot", "UnsupportedOperation")
        request = BootRequest(evidence_dir=tmp_path, time_limit=60, label="drill-impaired")
        verdict = AwsSandbox(poll=0.01)._judge(instance["InstanceId"], request, tmp_path, *[time.monotonic()] * 2)
    assert not verdict.passed and verdict.reason == "system: ok, instance: impaired"
    assert verdict.screenshot_path is None  # no screenshot is not a reason to lose the verdict


# --- A worker SIGKILLed mid-boot, against moto's server and real workers ------------------------

STALE_SECONDS = 3


# moto's server (its own GetConsoleOutput, which never shows a ready line; no GetConsoleScreenshot).
@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_boot_leaves_nothing_behind(user, settings, tmp_path):
    testing.require_services()
    assert connection.vendor == "postgresql"
    with testing.moto_server(settings) as endpoint:
        AccountLimits.objects.create(user=user, drill_sandbox="aws")
        settings.RECLO_DRILL_STALE_AFTER = timedelta(seconds=STALE_SECONDS)
        server = ServerFactory(user=user, name="front-desk")
        backups, _ = backup_chain(user=user, server=server, size=4 * MiB, incrementals=0)
        env = {
            "DATABASE_URL": testing.test_database_url(connection),
            "REDIS_URL": os.environ["REDIS_URL"],
            "AWS_ENDPOINT_URL": endpoint,
            "RECLO_BUCKET": settings.RECLO_BUCKET,
            "RECLO_DRILL_STALE_SECONDS": str(STALE_SECONDS),
            "RECLO_DRILL_DIR": str(tmp_path),
            "RECLO_DRILL_AWS_POLL": "0.2",
            "RECLO_DRILL_TIME_LIMIT": "600",
        }
        celery_app.conf.task_always_eager = False

        def booting() -> DrillStep:
            return DrillStep.objects.get(drill__user=user, name="booting")

        with testing.celery_worker(env) as first:
            drill = drill_services.drill_start(user=user, backup_id=backups[-1].pk)
            # Killed while the guest boots: the VPC, subnet, group and instance exist.
            testing.wait_until(
                lambda: booting().status == "running" and drill_inventory()["instances"] == 1,
                timeout=120,
                interval=0.2,
                what="the drill's instance to boot",
            )
            first_instance = compute.find_instances({"reclo:drill": f"drill-{drill.pk}"})[0].instance_id
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        assert drill_inventory()["instances"] == 1  # nobody tore it down: the worker is dead

        # The next worker takes the boot over (its time limit short, so it ends soon), then the teardown.
        env["RECLO_DRILL_TIME_LIMIT"] = "5"
        with testing.celery_worker(env):

            def finished_or_nudge():
                drill.refresh_from_db()
                if drill.status not in Drill.FINISHED or drill.torn_down is None:
                    tasks.drills_reconcile.delay()
                    return False
                return True

            testing.wait_until(finished_or_nudge, timeout=180, interval=STALE_SECONDS, what="the drill to end")
        assert drill.status == "failed" and "no login prompt" in drill.error
        assert booting().attempts >= 2
        assert compute.describe_instance(first_instance).state == "terminated"
        assert drill_inventory() == NOTHING
        assert all(r["removed"] for r in drill.resources)
