"""VM Import through its task states, scripted with botocore's Stubber (moto does not implement it)."""

import pytest
from botocore.stub import Stubber

from reclo_site.cloud import clients, imaging
from recovery import engine, paths, services, steps
from recovery.models import Recovery, RecoveryStep

pytestmark = pytest.mark.django_db

TASK = "import-ami-0123456789abcdef0"
IMAGE = "ami-0fedcba9876543210"


@pytest.fixture
def recovery(chain, user, drive):
    recovery = services.recovery_start(user=user, backup_id=chain[0][-1].pk, import_method="vm_import")
    drive(recovery.pk, until="importing")  # consolidating, for real, in moto's S3
    return recovery


@pytest.fixture
def ec2(monkeypatch):
    """A stubbed EC2 client behind the imaging adapter; every call must be scripted."""
    stubbed = clients.new_client("ec2")
    stubber = Stubber(stubbed)
    real = imaging.client
    monkeypatch.setattr(imaging, "client", lambda service: stubbed if service == "ec2" else real(service))
    with stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def expect_import(ec2, recovery, *, boot_mode="legacy-bios", platform="Linux", license_type="AWS"):
    key = RecoveryStep.objects.get(recovery=recovery, name="consolidating").outputs["image_key"]
    description = f"ReClo failover of {recovery.server_name}"
    ec2.add_response(
        "import_image",
        {"ImportTaskId": TASK, "Status": "active", "StatusMessage": "pending"},
        expected_params={
            "Description": description,
            "DiskContainers": [
                {"Description": description, "Format": "VHD", "UserBucket": {"S3Bucket": "reclo-test", "S3Key": key}}
            ],
            "RoleName": "vmimport",
            "ClientToken": f"reclo-{recovery.pk}",
            "BootMode": boot_mode,
            "LicenseType": license_type,
            "Platform": platform,
            # The imported image's snapshot is encrypted (AWS's default EBS key: no RECLO_KMS_KEY_ID).
            "Encrypted": True,
            "TagSpecifications": [
                {
                    "ResourceType": "import-image-task",
                    "Tags": [{"Key": k, "Value": v} for k, v in steps.recovery_tags(recovery, "server-import").items()],
                }
            ],
        },
    )


def expect_status(ec2, status, message="", progress=None, image_id=None):
    task = {"ImportTaskId": TASK, "Status": status}
    if message:
        task["StatusMessage"] = message
    if progress is not None:
        task["Progress"] = str(progress)
    if image_id:
        task["ImageId"] = image_id
    ec2.add_response(
        "describe_import_image_tasks", {"ImportImageTasks": [task]}, expected_params={"ImportTaskIds": [TASK]}
    )


def test_a_windows_server_goes_by_vm_import_with_its_boot_mode_and_licence(
    chain, user, drive, ec2, monkeypatch, settings
):  # noqa: E501
    # moto implements no ImportImage: the Stubber checks BootMode, LicenseType and Platform as sent.
    settings.RECLO_WINDOWS_LICENSE_TYPE = "BYOL"
    monkeypatch.setattr(paths, "_preflight", lambda server: {"os": "windows", "boot_mode": "uefi"})
    recovery = services.recovery_start(user=user, backup_id=chain[0][-1].pk)  # no method asked for
    assert recovery.import_method == "vm_import"
    drive(recovery.pk, until="importing")
    expect_import(ec2, recovery, boot_mode="uefi", platform="Windows", license_type="BYOL")
    expect_status(ec2, "completed", image_id=IMAGE)
    assert engine.run_step(recovery.pk, "importing") == "done"


def test_vm_import_is_polled_through_its_states_until_the_image_exists(recovery, ec2):
    expect_import(ec2, recovery)
    states = [("pending", 2), ("validated", 10), ("converting", 28), ("updating", 50), ("booting", 65),
              ("booted", 75), ("preparing ami", 85)]  # fmt: skip
    for message, progress in states:
        expect_status(ec2, "active", message, progress)
    expect_status(ec2, "completed", image_id=IMAGE)

    for message, progress in states:
        assert engine.run_step(recovery.pk, "importing") == "waiting"
        step = RecoveryStep.objects.get(recovery=recovery, name="importing")
        assert step.detail == f"VM Import: {message} ({progress}%)."
        assert step.outputs["import_task_id"] == TASK
    assert engine.run_step(recovery.pk, "importing") == "done"
    recovery.refresh_from_db()
    assert recovery.status == "launching"
    step = RecoveryStep.objects.get(recovery=recovery, name="importing")
    assert step.outputs == {"import_task_id": TASK, "image_id": IMAGE}
    assert step.waited == steps.IMPORT_POLL * len(states)


def test_a_failed_import_fails_the_recovery_with_403_and_the_reason(recovery, ec2):
    expect_import(ec2, recovery)
    expect_status(ec2, "active", "converting", 20)
    expect_status(ec2, "deleted", "ClientError: Unsupported kernel version 2.6.18")
    assert engine.run_step(recovery.pk, "importing") == "waiting"
    assert engine.run_step(recovery.pk, "importing") == "failed"
    recovery.refresh_from_db()
    assert (recovery.status, recovery.error_code) == ("failed", 403)
    assert "Unsupported kernel version" in recovery.error


def test_a_duplicate_poll_does_not_start_a_second_import(recovery, ec2):
    expect_import(ec2, recovery)
    expect_status(ec2, "active", "converting", 20)
    expect_status(ec2, "active", "converting", 21)
    assert engine.run_step(recovery.pk, "importing") == "waiting"
    assert engine.run_step(recovery.pk, "importing") == "waiting"  # a second delivery polls again, no new import


class Killed(BaseException):
    pass


def test_an_import_started_by_a_killed_worker_is_found_again_by_its_client_token(recovery, ec2, monkeypatch):
    expect_import(ec2, recovery)
    expect_import(ec2, recovery)  # AWS answers the same task for the same ClientToken
    expect_status(ec2, "completed", image_id=IMAGE)
    real = imaging.import_image
    calls = []

    def then_die(**kwargs):
        task = real(**kwargs)
        calls.append(task)
        if len(calls) == 1:
            raise Killed
        return task

    monkeypatch.setattr(imaging, "import_image", then_die)
    with pytest.raises(Killed):
        engine.run_step(recovery.pk, "importing")
    Recovery.objects.filter(pk=recovery.pk).update(lease_until=None)
    assert engine.run_step(recovery.pk, "importing") == "done"
    assert calls == [TASK, TASK]


def test_transient_vm_import_errors_are_retried(recovery, ec2):
    expect_import(ec2, recovery)
    ec2.add_client_error("describe_import_image_tasks", "RequestLimitExceeded", "slow down", 503)
    assert engine.run_step(recovery.pk, "importing") == "retrying"
    step = RecoveryStep.objects.get(recovery=recovery, name="importing")
    assert step.retries == 1 and step.outputs["import_task_id"] == TASK


def test_the_vmimport_role_documents_allow_only_what_vm_import_needs():
    trust = imaging.vmimport_trust_policy()
    (statement,) = trust["Statement"]
    assert statement["Principal"] == {"Service": "vmie.amazonaws.com"}
    assert statement["Condition"] == {"StringEquals": {"sts:Externalid": "vmimport"}}
    policy = imaging.vmimport_role_policy("reclo-backups", "images/")
    reads = [s for s in policy["Statement"] if "s3:GetObject" in s["Action"]]
    assert reads == [
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": ["arn:aws:s3:::reclo-backups/images/*"]}
    ]
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert not any(a.startswith(("s3:Put", "s3:Delete", "iam:")) for a in actions)
